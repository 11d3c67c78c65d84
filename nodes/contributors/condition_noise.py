"""CADS in ComfyUI models: the text tokens of the prompt's (and the uncond's) rows annealed with Gaussian noise
inside the same forward (``guiders/methods/cads.py`` holds the rule).

An APPLY_MODEL wrapper (``AnnealedCondition``, holding the node's frozen CADS settings) finds the rows of the
forward that carry the prompt (entry 0, and branches evaluated with the prompt's conditioning) and, with
``apply_to_uncond``, the uncond (entry 1 when it is the sampler's negative), and replaces their ``c_crossattn``
by ``transform_condition`` at this forward's progress. The noise is one draw per forward and stream, from
(seed, σ) (``Forward.noise_key``), shared by the rows: the same σ gives the same noise in one sampler call and
in a run split over several, and a batch equals single runs. NAG's negative tokens (appended after the
prompt's) are left as they are.
"""

from __future__ import annotations

import torch

from ...guiders.attention_ops import seeded_generator
from ...guiders.branch_inputs import standard_normal
from ...guiders.methods.cads import CADS
from ..runtime import install as installer
from ..runtime.rows import Forward, sigma_progress
from .nag import NAG_KEY

WRAPPER_KEY = "guidance_kit_cads"
_PROMPT, _UNCOND = 1, 2  # stream ids of the seeded draws


def _noised_rows(forward: Forward, apply_to_uncond: bool) -> dict[int, list[int]]:
    """stream → rows of this forward whose text CADS noises."""
    branch_map = forward.branch_map
    out: dict[int, list[int]] = {}
    for entry, span in forward.entry_rows():
        branch = branch_map.get(entry)
        if branch is None:
            stream = _PROMPT if entry == 0 else (_UNCOND if entry == 1 and apply_to_uncond else None)
        else:
            effect = branch.perturbation
            own = effect is not None and effect.conditioning_key() is not None
            stream = _PROMPT if branch.source == "cond" and not own and entry != 1 else None
        if stream is not None:
            out.setdefault(stream, []).extend(range(span.start, span.stop))
    return out


class AnnealedCondition:
    """APPLY_MODEL wrapper: this forward's prompt (and uncond) rows get the annealed tokens."""

    def __init__(self, settings: CADS):
        self.settings = settings

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        settings = self.settings
        to = transformer_options if isinstance(transformer_options, dict) else {}
        forward = Forward(to, x.shape[0])
        sigma = forward.sigma
        if sigma is None or not (torch.is_tensor(c_crossattn) and c_crossattn.ndim == 3):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        progress = sigma_progress(executor.class_obj.model_sampling, sigma)
        if not settings.acts_at(progress):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        groups = _noised_rows(forward, settings.apply_to_uncond)
        if not groups:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        nag = to.get(NAG_KEY)
        tokens = nag.positive_tokens if nag is not None else c_crossattn.shape[1]
        context = c_crossattn.clone()
        key = forward.noise_key
        for stream, rows in groups.items():
            index = torch.tensor(rows, dtype=torch.long, device=context.device)
            shape = (tokens, context.shape[2])
            noise = standard_normal(shape, seeded_generator(settings.seed, key, stream, *shape))
            noise = noise.to(device=context.device)
            context[index, :tokens] = settings.transform_condition(c_crossattn[index, :tokens], progress, noise)
        return executor(x, t, c_concat, context, control, transformer_options, **kwargs)


def install(model_patcher, settings: CADS) -> None:
    """Add the wrapper to a cloned ModelPatcher (the plan holds one CADS)."""
    installer.wrapper(model_patcher, WRAPPER_KEY, AnnealedCondition(settings))
