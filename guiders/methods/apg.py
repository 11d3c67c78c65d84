"""APG · Adaptive Projected Guidance: momentum, norm clip and parallel/orthogonal projection (stage 2,
a direction transform).

Paper: Sadat, Hilliges, Weber, "Eliminating Oversaturation and Artifacts of High Guidance Scales
in Diffusion Models", ICLR 2025 (arXiv 2410.02416), Algorithm 1, on denoised (x0) predictions:

    Δ_t  = C − U
    Δ̄_t  = Δ_t + β·Δ̄_{t+1}                 momentum (β < 0 in the paper; buffer carried over steps)
    Δ̄_t ← Δ̄_t · min(1, r / ‖Δ̄_t‖)          norm threshold r (0 = off)
    Δ∥   = (⟨Δ̄_t, C⟩ / ‖C‖²)·C,  Δ⊥ = Δ̄_t − Δ∥
    Δ'   = Δ⊥ + η·Δ∥
    D̂    = C + (w − 1)·Δ'

At η = 1, r = 0, β = 0 this is CFG at the same w (ComfyUI core's APG node gives CFG at w + 1
there; diffusers' gives U + w·Δ', which differs from the paper whenever η ≠ 1).
Norms and projections are per sample over all non-batch dims (C,T,H,W for video), in float32.

With a band split (FDG) the transform acts per band: by default only the projection ``Δ⊥ + η·Δ∥``
(diffusers' FrequencyDecoupledGuidance ``parallel_weights``; neither paper applies momentum or the clip per
band); ``fdg_mode="full"`` runs the whole rule per band, each band with its own momentum buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import DirectionTransform, PlanError
from ..tensor_ops import batch_dot, batch_norm, safe_divide, to_f32

if TYPE_CHECKING:
    from ..step import GuidanceState

APG_FDG_MODES = ("projection", "full")


def split_parallel(v: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v∥, v⊥): the components of v along ``direction`` and orthogonal to it, per sample, float32."""
    v = to_f32(v)
    d = to_f32(direction)
    coeff = safe_divide(batch_dot(v, d), batch_dot(d, d))
    parallel = coeff * d
    return parallel, v - parallel


def clip_norm(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """v·min(1, r/‖v‖) per sample; r ≤ 0 disables the clip."""
    if threshold <= 0:
        return v
    norm = batch_norm(v)
    scale = torch.clamp(safe_divide(torch.full_like(norm, threshold), norm), max=1.0)
    scale = torch.where(norm > 0, scale, torch.ones_like(scale))
    return to_f32(v) * scale


def momentum_update(delta: torch.Tensor, buffer: torch.Tensor | None, momentum: float) -> torch.Tensor:
    """Δ̄_t = Δ_t + β·Δ̄_{t+1}; the first step of a run has no buffer (Δ̄ = Δ)."""
    if momentum == 0 or buffer is None:
        return to_f32(delta)
    if buffer.shape != delta.shape:
        raise ValueError(f"APG momentum buffer has shape {tuple(buffer.shape)} but the guidance has "
                         f"{tuple(delta.shape)}; the batch changed within a sampling run")
    return to_f32(delta) + momentum * buffer


def project_guidance(delta: torch.Tensor, cond: torch.Tensor, eta: float) -> torch.Tensor:
    """Δ' = Δ⊥ + η·Δ∥ with the projection taken onto ``cond``."""
    parallel, orthogonal = split_parallel(delta, cond)
    return orthogonal + eta * parallel


def apg_direction(delta: torch.Tensor, cond: torch.Tensor, eta: float, norm_threshold: float,
                  momentum: float, buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The APG-transformed guidance direction Δ' and the new momentum buffer (float32).

    The guided prediction is ``C + (w − 1)·Δ'``.
    """
    averaged = momentum_update(delta, buffer, momentum)
    clipped = clip_norm(averaged, norm_threshold)
    return project_guidance(clipped, cond, eta), averaged


@dataclass(frozen=True)
class APG(DirectionTransform):
    """APG's settings; ``fdg_mode``: what it does per band when the plan has a band split (FDG)."""

    KEY = "apg"
    ORDER = 10

    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    label: str = "APG"
    fdg_mode: str = "projection"

    def validate(self) -> None:
        if self.fdg_mode not in APG_FDG_MODES:
            raise PlanError(f"{self.label}: fdg_mode must be one of {', '.join(APG_FDG_MODES)}; got {self.fdg_mode!r}")
        if self.norm_threshold < 0:
            raise PlanError(f"{self.label}: norm_threshold must be ≥ 0 (0 disables the clip); "
                            f"got {self.norm_threshold}")
        if not (-1.0 < self.momentum < 1.0):
            raise PlanError(f"{self.label}: momentum must be in (−1, 1) for the running sum to stay bounded; "
                            f"the paper uses −0.5 (got {self.momentum})")

    def transform_direction(self, direction: torch.Tensor, cond: torch.Tensor, band: int, banded: bool,
                            state: GuidanceState) -> torch.Tensor:
        if banded and self.fdg_mode == "projection":
            return project_guidance(direction, cond, self.eta)
        key = f"{self.KEY}/{band}"
        transformed, state.momentum[key] = apg_direction(direction, cond, self.eta, self.norm_threshold,
                                                         self.momentum, state.momentum.get(key))
        return transformed
