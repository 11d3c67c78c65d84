"""Rescale Guidance · RescaleCFG on the whole plan: the guided prediction's std matched to the
conditional prediction's in v space (stage 4, a correction).

Paper: Lin, Liu, Li, Yang, "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024
(arXiv 2305.08891), §3.4, with std per sample over all non-batch dims:

    v_re    = v̂·std(v_c)/std(v̂)
    v_final = φ·v_re + (1 − φ)·v̂

v is the VP v-prediction on eps/v models ("ve": ``x = x0 + σ·ε``, SD1.5, SD2, SDXL, EDM) and the velocity on
flow models ("flow": ``x = (1 − σ)·x0 + σ·n``, Flux, SD3, WAN, ...), the flow counterpart of the paper's
v-prediction. ComfyUI core's RescaleCFG applied the VP formula to every model up to 0.3.x; since 2026 it
rescales flow models in x0 space, ``x0_cfg·std(C)/std(x0_cfg)``, a different target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, Correction, GuidancePlan, PlanError
from ..tensor_ops import batch_std, per_sample, safe_divide, to_f32

if TYPE_CHECKING:
    from ..step import StepInputs

PARAMETERIZATIONS = ("ve", "flow")


def model_output_v(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                   parameterization: str) -> torch.Tensor:
    """The v-like quantity RescaleCFG rescales.

    "ve": the VP v-prediction ``√(σ²+1)/σ·(x/(σ²+1) − D)`` (exactly what ComfyUI core's
    RescaleCFG uses, correct for SD1.5/SD2/SDXL eps and v models); "flow": the velocity
    ``(x − D)/σ``. ``sigma`` is already broadcast to [B, 1, ...].
    """
    if parameterization == "flow":
        return (to_f32(x) - to_f32(denoised)) / sigma
    return (to_f32(x) / (sigma ** 2 + 1.0) - to_f32(denoised)) * (sigma ** 2 + 1.0).sqrt() / sigma


def denoised_from_v(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, parameterization: str) -> torch.Tensor:
    """Inverse of ``model_output_v``."""
    if parameterization == "flow":
        return to_f32(x) - sigma * v
    return to_f32(x) / (sigma ** 2 + 1.0) - v * sigma / (sigma ** 2 + 1.0).sqrt()


def rescale_to_cond_std(guided: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float,
                        parameterization: str, multiplier: float) -> torch.Tensor:
    """RescaleCFG on any guided prediction; φ = ``multiplier``, φ = 0 returns ``guided`` unchanged."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")
    if multiplier == 0:
        return guided
    s = per_sample(sigma, guided)
    v_guided = model_output_v(guided, x, s, parameterization)
    v_cond = model_output_v(cond, x, s, parameterization)
    ratio = safe_divide(batch_std(v_cond), batch_std(v_guided))
    ratio = torch.where(batch_std(v_guided) > 0, ratio, torch.ones_like(ratio))
    v_final = multiplier * (v_guided * ratio) + (1.0 - multiplier) * v_guided
    return denoised_from_v(v_final, x, s, parameterization).to(guided.dtype)


@dataclass(frozen=True)
class Rescale(Correction):
    """RescaleCFG-style std match to the cond prediction, in v space (velocity on flow models)."""

    KEY = "rescale"
    ORDER = 10

    multiplier: float = 0.7
    label: str = "Rescale"

    def validate(self) -> None:
        if not (0.0 <= self.multiplier <= 1.0):
            raise PlanError(f"{self.label}: multiplier is a blend in [0, 1] (got {self.multiplier})")

    def correct(self, guided: torch.Tensor, inp: StepInputs) -> torch.Tensor:
        return rescale_to_cond_std(guided, inp.cond, inp.x, inp.sigma, inp.parameterization, self.multiplier)

    def cfg_one(self, plan: GuidancePlan) -> CfgOne:
        return CfgOne.ACTS if plan.extra else CfgOne.INACTIVE  # at cfg 1 it still rescales the extra terms
