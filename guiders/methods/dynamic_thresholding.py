"""Dynamic Thresholding · the percentile clamp of the guided x0 (Imagen) and its "mimic" variant (stage 4, a
correction).

Imagen: Saharia et al., "Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding",
NeurIPS 2022, §2.3 (dynamic thresholding; diffusers' ``_threshold_sample``): per sample,

    s  = max(quantile_p(|x̂0|), r),    x̂0 ← clamp(x̂0, −s, s)·r/s

with r = 1 for pixel data in [−1, 1] (here ``data_range``, latents have other ranges).

Mimic (mcmonkeyprojects/sd-dynamic-thresholding, ``dynthres_core.py``, its default mode: constant scales,
"MEAN" start point, "AD" variability, per feature channel in its full ComfyUI node): the guided prediction
D at cfg w is given the value range of the same guidance at a lower "mimic" scale m. Per sample and channel
(over the spatial (and time) dims),

    M    = C + (m − 1)/(w − 1)·(D − C)          (= U + m·(C − U) for plain CFG, the reference's mimic target)
    μ_D  = mean(D),  D_c = D − μ_D,  M_c = M − mean(M)
    ref_M = max|M_c|,  ref_D = quantile_p(|D_c|),  top = max(ref_M, ref_D)
    D'   = clamp(D_c, −top, top)/top·ref_M + μ_D
    D̂    = φ·D' + (1 − φ)·D                     (``interpolate_phi``)

so |D̂ − μ_D| ≤ ref_M: the result never leaves the mimic scale's range around its mean. The reference forms
M from U; writing it from the plan's own result scales every stacked term (CFG-Zero*'s rewritten uncond,
APG, extra terms) to the mimic scale the same way, and equals the reference for plain CFG (tested). Its
schedules of the two scales (``mimic_mode``, ``cfg_mode``), the "ZERO" start point and the "STD" measure are
not ported (the pack's CFG Schedule shapes the cfg). At w ≤ 1 there is no guidance to rescale: no effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, Correction, Note, PlanError
from ..tensor_ops import to_f32

if TYPE_CHECKING:
    from ..step import StepInputs

DYNAMIC_THRESHOLDING_MODES = ("mimic", "imagen")


def row_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile along the last dim with linear interpolation (as torch.quantile), by sorting:
    no input-size limit (torch.quantile refuses large inputs)."""
    ordered = values.sort(dim=-1).values
    position = q * (values.shape[-1] - 1)
    low = int(position)
    high = min(low + 1, values.shape[-1] - 1)
    fraction = position - low
    return ordered[..., low] + (ordered[..., high] - ordered[..., low]) * fraction


def mimic_threshold(guided: torch.Tensor, mimic: torch.Tensor, percentile: float, per_channel: bool = True,
                    interpolate_phi: float = 1.0) -> torch.Tensor:
    """``guided`` given the value range of ``mimic`` (the mimic-scale prediction). Values are centred per sample
    and channel; the ranges are measured per sample and channel, or (``per_channel`` off) per sample over all its
    channels. Float32."""
    guided, mimic = to_f32(guided), to_f32(mimic)
    batch, channels = guided.shape[:2]
    g_rows, m_rows = guided.reshape(batch, channels, -1), mimic.reshape(batch, channels, -1)
    g_mean = g_rows.mean(dim=2, keepdim=True)
    g_centered = g_rows - g_mean
    m_centered = m_rows - m_rows.mean(dim=2, keepdim=True)
    if per_channel:
        mimic_ref = m_centered.abs().amax(dim=2, keepdim=True)
        guided_ref = row_quantile(g_centered.abs(), percentile).unsqueeze(2)
    else:
        mimic_ref = m_centered.abs().reshape(batch, -1).amax(dim=1).reshape(batch, 1, 1)
        guided_ref = row_quantile(g_centered.abs().reshape(batch, -1), percentile).reshape(batch, 1, 1)
    top = torch.maximum(mimic_ref, guided_ref)
    safe_top = torch.where(top > 0, top, torch.ones_like(top))
    renormalized = torch.where(top > 0, torch.minimum(torch.maximum(g_centered, -top), top) / safe_top * mimic_ref,
                               g_centered)
    result = (renormalized + g_mean).reshape(guided.shape)
    if interpolate_phi != 1.0:
        result = interpolate_phi * result + (1.0 - interpolate_phi) * guided
    return result


def imagen_threshold(denoised: torch.Tensor, percentile: float, data_range: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding per sample: s = max(quantile_p(|x̂0|), r), x̂0 ← clamp(x̂0, −s, s)·r/s."""
    denoised = to_f32(denoised)
    rows = denoised.reshape(denoised.shape[0], -1)
    bound = row_quantile(rows.abs(), percentile).clamp(min=data_range).unsqueeze(1)
    return (torch.minimum(torch.maximum(rows, -bound), bound) * (data_range / bound)).reshape(denoised.shape)


@dataclass(frozen=True)
class DynamicThresholding(Correction):
    """Dynamic thresholding's settings: ``mode`` "mimic" (sd-dynamic-thresholding's default) or "imagen"."""

    KEY = "dynamic_thresholding"
    ORDER = 5  # before Rescale: the mimic target reads the plan's increment D − C before any std match

    mode: str = "mimic"
    mimic_scale: float = 7.0
    percentile: float = 1.0
    per_channel: bool = True
    interpolate_phi: float = 1.0
    data_range: float = 1.0
    label: str = "Dynamic Thresholding"

    def validate(self) -> None:
        if self.mode not in DYNAMIC_THRESHOLDING_MODES:
            raise PlanError(f"{self.label}: mode must be one of {', '.join(DYNAMIC_THRESHOLDING_MODES)}; "
                            f"got {self.mode!r}")
        if not 0.0 < self.percentile <= 1.0:
            raise PlanError(f"{self.label}: threshold_percentile must be in (0, 1] (1 = the maximum, Imagen uses "
                            f"0.995); got {self.percentile}")
        if self.mimic_scale < 1.0 and self.mode == "mimic":
            raise PlanError(f"{self.label}: mimic_scale must be ≥ 1 (the lower cfg whose range is kept; the "
                            f"reference's default is 7); got {self.mimic_scale}")
        if not 0.0 <= self.interpolate_phi <= 1.0:
            raise PlanError(f"{self.label}: interpolate_phi is a blend in [0, 1]; got {self.interpolate_phi}")
        if self.data_range <= 0.0:
            raise PlanError(f"{self.label}: imagen_range must be > 0; got {self.data_range}")

    def correct(self, guided: torch.Tensor, inp: StepInputs) -> torch.Tensor:
        if self.mode == "imagen":
            return imagen_threshold(guided, self.percentile, self.data_range)
        if inp.uncond is None or inp.cond_scale <= 1.0:
            return guided  # no guidance at this step: nothing to rescale
        cond = to_f32(inp.cond)
        mimic = cond + (self.mimic_scale - 1.0) / (inp.cond_scale - 1.0) * (to_f32(guided) - cond)
        return mimic_threshold(guided, mimic, self.percentile, self.per_channel, self.interpolate_phi)

    def cfg_one(self, plan) -> CfgOne:
        return CfgOne.ACTS if self.mode == "imagen" else CfgOne.INACTIVE

    def cfg_notes(self, cond_scale: float) -> list[Note]:
        if self.mode != "mimic" or cond_scale <= 1.0 or cond_scale > self.mimic_scale:
            return []
        return [("dynthres-low-cfg", (
            f"{self.label}: cfg {cond_scale:g} is not above mimic_scale {self.mimic_scale:g}, so the mimic range is "
            f"wider than the guided prediction's and the node has little or no effect. It is meant for a high cfg "
            f"(e.g. 15–30) with mimic_scale at the cfg whose look you want (e.g. 7)."))]
