"""ICG in ComfyUI models: the unconditional rows evaluated under a condition independent of the prompt.

Sadat, Kansy, Hilliges, Weber, "No Training, No Problem: Rethinking Classifier-Free Guidance for
Diffusion Models" (ICLR 2025, arXiv 2407.02687): ``D = D(ŷ) + w·(D(y) − D(ŷ))`` with ŷ drawn
independently of the data — Gaussian noise on the scale of the condition, redrawn at every sampling
step (the paper's OpenReview reviews summarise its algorithm with ŷ "sampled independent of y at each
time-step"). No official code exists.

The engine evaluates ICG's branch in the uncond entry of the batched call (``IndependentCondition``
in the plan) with copies of the prompt's conds (``RandomCondition.rewrite_cond`` only checks that the
model has a text context). An APPLY_MODEL wrapper (``independent_condition_wrapper``) then replaces,
on the ICG rows only and inside the same forward:

* the text tokens (``c_crossattn``) by Gaussian tokens with each row's per-channel mean/std over its
  tokens (``guiders.branch_inputs.independent_embedding``);
* the pooled text vector where the model has one (SDXL's first 1280 ADM channels, the whole ``y`` of
  Flux, SD3/3.5, HunyuanVideo, HiDream) by a Gaussian vector with the row's mean/std over channels
  (``independent_vector``): with the prompt's pooled vector kept, the "independent" condition would
  still carry the prompt. Size/crop ADM channels and Flux's guidance value are not text and stay.

The noise is one tensor per step, drawn from (seed, σ) (``Forward.noise_key``) and shared by the ICG
rows: a run split over two sampler calls equals one call, and a batch equals runs of batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...guiders.attention_ops import seeded_generator
from ...guiders.branch_inputs import independent_embedding, independent_vector, standard_normal
from ...guiders.plan import BranchEffect
from ..runtime import install as installer
from ..runtime.families import FamilyError, model_variant
from ..runtime.rows import Forward
from .nag import NAG_KEY

WRAPPER_KEY = "guidance_kit_icg"
_TOKENS, _POOLED = 1, 2  # stream ids of the seeded draws


def pooled_width(model) -> int | None:
    """How many leading channels of the model input ``y`` are the pooled text vector (0 = none, None = all;
    the family table's ``MODEL_VARIANTS``)."""
    return model_variant(model).pooled_width


@dataclass(frozen=True)
class RandomCondition(BranchEffect):
    """ICG's independent condition (``Branch.perturbation`` of the uncond source; frozen, no tensors).

    ``pooled``: also replace the pooled text vector (the paper's definition: the whole condition
    independent of the prompt). False keeps the prompt's pooled vector (the pack's earlier behaviour).
    """

    method: str
    seed: int = 0
    pooled: bool = True

    def rewrite_cond(self, cond: dict) -> dict:
        model_conds = cond.get("model_conds")
        cross = model_conds.get("c_crossattn") if isinstance(model_conds, dict) else None
        if not torch.is_tensor(getattr(cross, "cond", None)):
            raise FamilyError(f"{self.method}: this model's conditioning has no cross-attention/text context to "
                                    f"replace by an independent one; ICG needs a text- or token-conditioned model.")
        return cond  # the tokens are replaced per step inside the forward (independent_condition_wrapper)


def _draw(p: RandomCondition, key: int, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    return standard_normal(shape, seeded_generator(p.seed, key, stream, *shape))


def independent_condition_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                                  transformer_options=None, **kwargs):
    """APPLY_MODEL wrapper: the ICG rows of this forward get this step's independent tokens and pooled vector."""
    to = transformer_options
    forward = Forward(to, x.shape[0])
    groups = forward.of_type(RandomCondition) if isinstance(to, dict) else []
    if not groups:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    owner = groups[0][0].method
    if not (torch.is_tensor(c_crossattn) and c_crossattn.ndim == 3):
        raise FamilyError(f"{owner}: this model call has no text context tokens to replace by an independent "
                                f"condition; ICG needs a text- or token-conditioned model.")
    nag = to.get(NAG_KEY)
    tokens = nag.positive_tokens if nag is not None else c_crossattn.shape[1]  # NAG's negative tokens follow
    key = forward.noise_key
    context = c_crossattn.clone()
    width = pooled_width(executor.class_obj)
    y = kwargs.get("y")
    replace_pooled = width != 0 and torch.is_tensor(y) and y.ndim == 2
    if replace_pooled:
        y = y.clone()
        width = y.shape[1] if width is None else min(width, y.shape[1])
    for p, rows in groups:
        rows = rows.to(context.device)
        noise = _draw(p, key, _TOKENS, (tokens, context.shape[2]))
        context[rows, :tokens] = independent_embedding(c_crossattn[rows, :tokens], noise)
        if replace_pooled and p.pooled:
            y[rows, :width] = independent_vector(y[rows, :width], _draw(p, key, _POOLED, (width,)))
    if replace_pooled:
        kwargs["y"] = y
    return executor(x, t, c_concat, context, control, transformer_options, **kwargs)


def install(model_patcher) -> None:
    """Add the wrapper to a cloned ModelPatcher (idempotent)."""
    installer.wrapper(model_patcher, WRAPPER_KEY, independent_condition_wrapper)
