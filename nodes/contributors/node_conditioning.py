"""A conditioning a node brings for one of its branches (Perp-Neg's and DNG's negative prompt), evaluated in the
same batched call as the prompts.

The node installs an ``OUTER_SAMPLE`` wrapper (``ConditioningInput``) that adds its CONDITIONING to the guider's
conds under the node's key before ComfyUI prepares them, so ComfyUI processes it exactly like the sampler's
negative (areas, masks, ControlNet, the model's extra conds, ``prompt_type`` "negative"). The branch's effect
(``NodeConditioning``, frozen and tensor-free like the rest of the plan) names that key; the engine evaluates
the branch's entry with it (``BranchEffect.conditioning_key``). Nothing outlives the sampler call: the entry
is removed from the guider's conds when the call ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...guiders.plan import BranchEffect
from ..runtime import install as installer

KEY_PREFIX = "guidance_kit_conditioning/"


@dataclass(frozen=True)
class NodeConditioning(BranchEffect):
    """The branch is the model evaluated with the conditioning the node ``owner`` brought under ``key``."""

    key: str
    owner: str

    def conditioning_key(self) -> str:
        return KEY_PREFIX + self.key


def checked(owner: str, field: str, conditioning) -> list:
    """``conditioning`` when it is a CONDITIONING (a list of [tensor, dict] entries); else a message naming the node."""
    ok = isinstance(conditioning, list) and conditioning and all(
        isinstance(c, (list, tuple)) and len(c) == 2 and torch.is_tensor(c[0]) and isinstance(c[1], dict)
        for c in conditioning)
    if not ok:
        raise ValueError(f"{owner}: {field} is not a conditioning; connect a CLIP Text Encode (of what to avoid).")
    return conditioning


class ConditioningInput:
    """OUTER_SAMPLE wrapper: the node's conditioning joins the guider's conds for this sampler call."""

    def __init__(self, key: str, conditioning: list):
        self.key = KEY_PREFIX + key
        self.conditioning = [[tokens, {**extra, "prompt_type": "negative"}] for tokens, extra in conditioning]

    def __call__(self, executor, *args, **kwargs):
        import comfy.sampler_helpers

        guider = executor.class_obj
        conds = getattr(guider, "conds", None)
        if not isinstance(conds, dict):
            return executor(*args, **kwargs)
        conds[self.key] = comfy.sampler_helpers.convert_cond(self.conditioning)
        try:
            return executor(*args, **kwargs)
        finally:
            conds = getattr(guider, "conds", None)
            if isinstance(conds, dict):
                conds.pop(self.key, None)


def install(model_patcher, key: str, conditioning: list) -> None:
    """Add the wrapper bringing ``conditioning`` under ``key`` to a cloned ModelPatcher (the plan holds one method
    per key, so a key is installed once)."""
    import comfy.patcher_extension

    installer.wrapper(model_patcher, KEY_PREFIX + key, ConditioningInput(key, conditioning),
                      comfy.patcher_extension.WrappersMP.OUTER_SAMPLE)
