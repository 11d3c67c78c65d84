"""SAG's branch: the unconditional x0 blurred where the model attends, re-noised, evaluated again.

Self-Attention Guidance (Hong et al., ICCV 2023). Inside the batched call a contributor on the pack's slot of the
first self-attention of the UNet's middle block (``attn1`` of ``("middle", 0, 0)``) computes the attention map
of the uncond rows and keeps, per key token, the sum over queries of the head-mean map (``SAGRecorder``). After
that call ``SAGDegradation.run`` (a ``BranchEffect`` runner, fed the call's predictions) thresholds it into a
mask, blurs the uncond x0 inside the mask, re-noises it with the uncond's own noise (``degraded + x − uncond``)
and evaluates the uncond conditioning on it: one extra call holding every row of the branch. It depends on this
step's uncond prediction, so it cannot share the batched call. It returns ``C − (degraded − SAG)`` so the extra term
``s·(C − B)`` adds ``s·(degraded − SAG)``, core's post-cfg term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...guiders.plan import BranchEffect
from ..runtime import install as installer
from ..runtime.engine import EvaluationHook, GuidanceRuntimeError, add_evaluation_hook
from ..runtime.rows import BRANCH_MAP_KEY, chunk_rows, sigma_value
from ..runtime.slots import Contributor

SAG_RECORDER_KEY = "guidance_kit_sag_recorder"
BLUR_KERNEL = 9
MIN_SIDE = BLUR_KERNEL // 2 + 1  # reflect padding needs sides above the half kernel


class SAGRecorder:
    """One evaluation's record: ``scores[b, key] = Σ_query mean_heads softmax(q·k)`` of the uncond rows."""

    def __init__(self):
        self.scores: torch.Tensor | None = None


def uncond_attention_scores(q, k, heads: int, attn_precision=None) -> torch.Tensor:
    """``[B, N]``: per key token, the sum over queries of the head-mean softmax map of ``[B, N, heads·d]`` q, k."""
    b, _, inner = q.shape
    dim_head = inner // heads
    q, k = (t.reshape(b, -1, heads, dim_head).permute(0, 2, 1, 3).reshape(b * heads, -1, dim_head) for t in (q, k))
    if attn_precision == torch.float32:
        q, k = q.float(), k.float()
    attention = (torch.bmm(q, k.transpose(1, 2)) * dim_head ** -0.5).softmax(dim=-1)
    return attention.reshape(b, heads, *attention.shape[-2:]).mean(1).sum(1)


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
            recorder.scores = uncond_attention_scores(call.q[rows], call.k[rows], call.options["n_heads"],
                                                      call.options.get("attn_precision"))
        return inner(call)


CONTRIBUTOR = SAGRecording()
MIDDLE_SELF_ATTENTION = ("middle", 0, 0)  # core's and the official code's: mid_block.attentions[0] …[0].attn1


def install(model_patcher) -> None:
    installer.unet_attention(model_patcher, "attn1", (MIDDLE_SELF_ATTENTION,), CONTRIBUTOR)
    add_evaluation_hook(model_patcher, SAGEvaluation())


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of ``tokens`` attention tokens laid over a height × width latent (a UNet level)."""
    for level in range(0, 8):
        rows, cols = math.ceil(height / 2 ** level), math.ceil(width / 2 ** level)
        if rows * cols == tokens:
            return rows, cols
    raise GuidanceRuntimeError(f"SAG: {tokens} attention tokens do not tile a {height}×{width} latent.")


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(device=image.device, dtype=image.dtype)
    channels = image.shape[-3]
    kernel = (weights[:, None] * weights[None, :]).expand(channels, 1, kernel_size, kernel_size)
    padded = F.pad(image, [kernel_size // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


def blur_attended(x0: torch.Tensor, scores: torch.Tensor, blur_sigma: float, threshold: float) -> torch.Tensor:
    """x0 blurred where the summed attention exceeds ``threshold`` (nearest-upsampled mask), unchanged elsewhere."""
    height, width = x0.shape[-2:]
    rows, cols = token_grid(scores.shape[-1], height, width)
    mask = (scores > threshold).reshape(x0.shape[0], 1, rows, cols).to(scores.dtype)
    mask = F.interpolate(mask, (height, width)).to(x0.dtype)
    return gaussian_blur(x0, blur_sigma) * mask + x0 * (1 - mask)


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
                f"replaced the middle block's attn1 patch after the SAG node. Put SAG after it.")
        degraded = blur_attended(uncond_pred, recorder.scores, self.blur_sigma, self.threshold)
        options = dict(model_options)
        options["transformer_options"] = {k: v for k, v in to.items() if k not in (BRANCH_MAP_KEY, SAG_RECORDER_KEY)}
        preds = comfy.samplers.calc_cond_batch(model, conds, degraded + x - uncond_pred, sigma, options)
        return [cond_pred - (degraded - p) for p in preds]
