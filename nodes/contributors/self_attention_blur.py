"""SAG's branch: the unconditional x0 blurred where the model attends, re-noised, evaluated again.

Self-Attention Guidance (Hong et al., ICCV 2023). Inside the batched call a contributor on the pack's slot of the
first self-attention of the UNet's middle block (``attn1`` of ``("middle", 0, 0)``) computes the attention map
of the uncond rows and keeps, per key token, the sum over queries of the head-mean map (``SAGRecorder``). After
that call ``SAGDegradation.run`` (a ``BranchEffect`` runner, fed the call's predictions) thresholds it into a
mask, blurs the uncond x0 inside the mask, re-noises it with the uncond's own noise (``degraded + x − uncond``)
and evaluates the uncond conditioning on it: one extra call holding every row of the branch. It depends on this
step's uncond prediction, so it cannot share the batched call. It returns ``C − (degraded − SAG)`` so the extra term
``s·(C − B)`` adds ``s·(degraded − SAG)``, core's post-cfg term.

On Flux and SD3/SD3.5 (the pack's extension; the paper has no DiT setting) the contributor sits on the middle
double block's hook and the attention dispatcher: in that block's joint attention call it reads the image-token
queries' softmax over the image-token keys of the uncond rows (chunk-wise); the mask lies on the 2 × 2 patch grid,
and the re-noise follows the model's sampling (flow: ``x + (1 − σ)·(degraded − uncond)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...guiders.attention_blur import MIN_SIDE, TokenGridError, attention_scores, blur_attended, image_attention_scores
from ...guiders.plan import BranchEffect
from ..runtime import install as installer
from ..runtime.attention_layout import heads_of, to_bhld
from ..runtime.blocks import block_layout
from ..runtime.engine import EvaluationHook, GuidanceRuntimeError, add_evaluation_hook
from ..runtime.families import FamilyError
from ..runtime.rows import BRANCH_MAP_KEY, chunk_rows, sigma_value
from ..runtime.slots import BlockCall, Contributor

SAG_RECORDER_KEY = "guidance_kit_sag_recorder"


class SAGRecorder:
    """One evaluation's record: ``scores[b, key] = Σ_query mean_heads softmax(q·k)`` of the uncond rows."""

    def __init__(self):
        self.scores: torch.Tensor | None = None


class SAGRecording(Contributor):
    """On the middle block's ``attn1`` slot: reads the uncond rows' attention map as the model makes the call
    (outermost, before any perturbation splits the rows); the attention itself runs unchanged."""

    ORDER = 5
    NAME = "sag"

    def unet_self_attention(self, call, inner):
        recorder = call.options.get(SAG_RECORDER_KEY)
        chunks = call.options.get("cond_or_uncond") or []
        if recorder is not None and 1 in chunks:
            rows = dict(chunk_rows(chunks, call.q.shape[0]))[1]
            recorder.scores = attention_scores(call.q[rows], call.k[rows], call.options["n_heads"],
                                                      call.options.get("attn_precision"))
        return inner(call)

    def block(self, call: BlockCall) -> None:
        """DiT (Flux, SD3): in the chosen joint block, mark the uncond rows for the joint attention call."""
        chunks = call.options.get("cond_or_uncond") or []
        if call.options.get(SAG_RECORDER_KEY) is not None and 1 in chunks:
            call.attention_context().parts[self] = dict(chunk_rows(chunks, call.batch_size))[1]

    def attention(self, call, inner):
        """DiT: the image-token queries' attention over the image-token keys of the uncond rows (the joint call)."""
        ctx = call.ctx
        rows = ctx.parts.get(self) if ctx is not None else None
        recorder = call.options.get(SAG_RECORDER_KEY)
        if rows is None or recorder is None or call.index != 1 or call.image is None:
            return inner(call)
        heads = heads_of(call.args, call.kwargs)
        skip_reshape = call.kwargs.get("skip_reshape", False)
        q, k = (to_bhld(t[rows], heads, skip_reshape)[:, :, call.image] for t in call.args[:2])
        recorder.scores = image_attention_scores(q, k)
        return inner(call)


CONTRIBUTOR = SAGRecording()
MIDDLE_SELF_ATTENTION = ("middle", 0, 0)  # core's and the official code's: mid_block.attentions[0] …[0].attn1
DIT_FAMILIES = ("Flux", "SD3/SD3.5")  # joint double blocks whose joint attention call the pack can read


def dit_block(model_patcher, spec) -> tuple[str, int]:
    """The pack's choice on DiTs (the paper has none): the middle joint (double) block, index ⌊count / 2⌋."""
    count = block_layout(model_patcher, spec).dit_blocks.get("double", 0)
    if count == 0:
        raise FamilyError(f"SAG: this {spec.name} model has no joint (double) blocks.")
    return ("double", count // 2)


def install(model_patcher, spec=None) -> tuple:
    """Install the recording slot; returns the block it reads (UNet: the middle block's attn1)."""
    if spec is None or spec.is_unet:
        installer.unet_attention(model_patcher, "attn1", (MIDDLE_SELF_ATTENTION,), CONTRIBUTOR)
        chosen = MIDDLE_SELF_ATTENTION
    else:
        chosen = dit_block(model_patcher, spec)
        installer.dit_blocks(model_patcher, spec, block_layout(model_patcher, spec), (chosen,), CONTRIBUTOR)
        installer.attention(model_patcher, CONTRIBUTOR)
    add_evaluation_hook(model_patcher, SAGEvaluation())
    return chosen


class SAGEvaluation(EvaluationHook):
    """A recorder for the batched call of each step where a SAG term acts."""

    KEY = SAG_RECORDER_KEY

    def begin(self, plan, position, sigma, x, guided: bool):
        for term in plan.extra:
            branch = getattr(term, "branch", None)
            if (branch is not None and isinstance(branch.perturbation, SAGDegradation)
                    and term.branches_at(position, sigma_value(sigma))):
                return SAGRecorder()
        return None


@dataclass(frozen=True)
class SAGDegradation(BranchEffect):
    label: str
    blur_sigma: float
    threshold: float = 1.0

    USES_MAIN_PREDICTIONS = True

    def runner(self) -> SAGDegradation:
        return self

    def run(self, model, conds: list, x, sigma, model_options: dict, main: list | None = None) -> list:
        import comfy.samplers

        cond_pred = main[0] if main else None
        uncond_pred = main[1] if main and len(main) > 1 else None
        to = model_options.get("transformer_options", {})
        recorder = to.get(SAG_RECORDER_KEY)
        if cond_pred is None or uncond_pred is None:
            raise GuidanceRuntimeError(
                f"{self.label}: this step has no unconditional prediction to blur (cfg 1 without the uncond, or "
                f"another node evaluates the uncond elsewhere). Use a cfg above 1 with SAG.")
        if min(x.shape[-2:]) < MIN_SIDE:
            return [cond_pred for _ in conds]  # too small for the blur kernel: the term is 0 (as core)
        if recorder is None or recorder.scores is None:
            raise GuidanceRuntimeError(
                f"{self.label}: no self-attention map was recorded in the middle block this step: another node "
                f"replaced the middle block's attn1 patch (UNet) or the chosen block's patch (DiT) after the SAG "
                f"node. Put SAG after it.")
        try:
            degraded = blur_attended(uncond_pred, recorder.scores, self.blur_sigma, self.threshold)
        except TokenGridError as e:
            raise GuidanceRuntimeError(f"{self.label}: {e}") from None
        options = dict(model_options)
        options["transformer_options"] = {k: v for k, v in to.items() if k not in (BRANCH_MAP_KEY, SAG_RECORDER_KEY)}
        preds = comfy.samplers.calc_cond_batch(model, conds, degraded_input(model, x, sigma, degraded, uncond_pred),
                                               sigma, options)
        return [cond_pred - (degraded - p) for p in preds]


def degraded_input(model, x, sigma, degraded, uncond_pred):
    """The degraded x0 re-noised with the uncond's own noise, by the model's own noise scaling: ε-type models
    (x = x0 + σ·ε) give ``x + degraded − uncond``; flow models (CONST: x = (1 − σ)·x0 + σ·ε) give
    ``x + (1 − σ)·(degraded − uncond)``."""
    import comfy.model_sampling

    if isinstance(model.model_sampling, comfy.model_sampling.CONST):
        keep = 1.0 - sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1)).to(x.dtype)
        return x + keep * (degraded - uncond_pred)
    return degraded + x - uncond_pred
