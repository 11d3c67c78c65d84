"""ADG · Angle Domain Guidance: rotate the conditional prediction away from the unconditional one instead of
extrapolating (stage 2, a direction transform that reads the CFG weight).

Paper: Jin, Xiao, Liu, Gu, "Angle Domain Guidance: Latent Diffusion Requires Rotation Rather Than
Extrapolation", ICML 2025 (arXiv 2506.11039); official code jinc7461/ADG, ``method/ADG_SD3.py`` (``ADG_SD3``)
and ``method/utils.py``, on the denoised predictions x̂ (per sample, over the whole latent):

    w' = max(w − 1, 0) + 10⁻³
    θ  = ∠(C, U),   θ' = clip(w'·θ, −θ_max, θ_max)          (θ_max = ``angle``, official π/3 ≈ 3.14/3)
    P  = (C − U) − ⟨C − U, U⟩/(‖U‖² + 10⁻⁸)·U               (the difference, orthogonal to U)
    D̂  = cos θ'·C + sin θ'/sin θ·P                          (sin θ ≤ 10⁻³: cos θ'·C + w'·P)

CFG's extrapolation U + w·(C − U) grows ‖D̂‖ with w (over-saturated colours); ADG keeps
‖D̂‖² = ‖C‖²·(1 + sin 2θ'·sin θ) ≤ 2‖C‖². In the plan W is the band's weight after the schedule and the weight
factors (its mean per sample for a per-pixel map), U the rewritten uncond; with a band split (FDG) the rule
acts per band. The official ``ADG_SD3_w_norm`` variant (renormalised to ‖C‖ per row) is not ported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import PlanError
from ..tensor_ops import to_f32
from .weighted_transform import WeightedTransform

if TYPE_CHECKING:
    from ..step import GuidanceState

ADG_OFFICIAL_ANGLE = 3.14 / 3  # the official default (π/3 rounded as in ADG_SD3)


def angle_domain_guidance(cond: torch.Tensor, uncond: torch.Tensor, weight, max_angle: float) -> torch.Tensor:
    """ADG's guided prediction for a per-sample (or scalar) weight w. Float32, computed in float64."""
    shape = cond.shape
    c = cond.reshape(shape[0], -1).double()
    u = uncond.reshape(shape[0], -1).double()
    w = torch.as_tensor(weight, dtype=torch.float64, device=cond.device).reshape(-1, 1)
    w = torch.clamp(w - 1.0, min=0.0) + 1e-3
    cosine = (c / c.norm(dim=1, keepdim=True) * (u / u.norm(dim=1, keepdim=True))).sum(dim=1, keepdim=True)
    theta = torch.acos(cosine.clamp(-1.0, 1.0))
    theta_new = torch.clamp(w * theta, -max_angle, max_angle)
    difference = c - u
    perpendicular = difference - (difference * u).sum(dim=1, keepdim=True) / ((u * u).sum(dim=1, keepdim=True)
                                                                             + 1e-8) * u
    sin_theta = torch.sin(theta)
    safe_sin = torch.where(sin_theta > 1e-3, sin_theta, torch.ones_like(sin_theta))
    rotated = torch.where(sin_theta > 1e-3, perpendicular * torch.sin(theta_new) / safe_sin, perpendicular * w)
    return (torch.cos(theta_new) * c + rotated).reshape(shape).float()


@dataclass(frozen=True)
class ADG(WeightedTransform):
    """ADG's settings: the largest rotation angle (radians)."""

    KEY = "adg"
    ORDER = 40  # after every weight factor (it reads the final W) and after APG's transform

    max_angle: float = ADG_OFFICIAL_ANGLE
    label: str = "ADG"

    def validate(self) -> None:
        if not 0.0 < self.max_angle <= math.pi / 2:
            raise PlanError(f"{self.label}: max_angle must be in (0, π/2] radians (official π/3 ≈ 1.047); "
                            f"got {self.max_angle}")

    def transform_direction(self, direction: torch.Tensor, cond: torch.Tensor, band: int, banded: bool,
                            state: GuidanceState) -> torch.Tensor:
        cond = to_f32(cond)
        weight = self.band_weight(state, band, cond, per_sample=True)
        guided = angle_domain_guidance(cond, cond - to_f32(direction), weight.reshape(-1), self.max_angle)
        return self.as_increment(guided, cond, weight)
