"""Power-law CFG · a CFG weight that grows as a power of the score difference (stage 2, a weight factor).

Paper: Lehman Pavasovic, Verbeek, Biroli, Mézard, "Understanding Classifier-Free Guidance: High-Dimensional
Theory and Non-Linear Generalizations", arXiv 2502.07849: the non-linear "power-law" CFG

    ŝ = s_u + ω·(s_c − s_u),    ω = w·‖s_c − s_u‖^α

which guides more where the conditional and unconditional scores differ a lot and little where they agree
(α > 0), or the reverse (α < 0). No official code was found; the units of the score difference and the clamp
follow the most used ComfyUI port (the "Power Law CFG" node, ``powerlaw-cfg_cui-ggf``): per sample,

    Δs = (C − U)·k(σ),  k = 1/(σ² + 1) on eps/v models, (1 − σ)/(σ² + 1) on flow models
    ω  = max(w·(‖Δs‖₂ + 10⁻⁶)^α, 1),            D̂ = U + ω·(C − U)

(‖·‖₂ over the whole latent: the same α is stronger on larger latents). In the plan the factor multiplies
the weight W of every band after the schedule and β-CFG, then the clamp at 1 (never below the conditional
prediction). It acts at cfg 1 too (ω = ‖Δs‖^α there), so the uncond is evaluated at cfg 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, Note, PlanError, WeightFactor
from ..tensor_ops import batch_norm, per_sample, to_f32

if TYPE_CHECKING:
    from ..step import DirectionInputs, GuidanceState

POWER_LAW_EPSILON = 1e-6


def score_difference_scale(sigma: torch.Tensor, parameterization: str) -> torch.Tensor:
    """k(σ) turning C − U into the score difference (the port's units)."""
    if parameterization == "flow":
        return (1.0 - sigma) / (sigma ** 2 + 1.0)
    return 1.0 / (sigma ** 2 + 1.0)


def power_law_factor(cond: torch.Tensor, uncond: torch.Tensor, sigma, parameterization: str,
                     alpha: float) -> torch.Tensor:
    """(‖Δs‖₂ + 10⁻⁶)^α per sample, float32 [B, 1, ...]."""
    s = per_sample(sigma, cond)
    difference = (to_f32(cond) - to_f32(uncond)) * score_difference_scale(s, parameterization)
    return (batch_norm(difference) + POWER_LAW_EPSILON).pow(alpha)


@dataclass(frozen=True)
class PowerLawCFG(WeightFactor):
    """Power-law CFG's settings: the exponent α."""

    KEY = "power_law_cfg"
    ORDER = 15  # after β-CFG's factor, before S-CFG's map; the clamp at 1 makes the order matter
    AT_CFG_ONE = CfgOne.NEEDS_UNCOND

    alpha: float = 0.9
    label: str = "Power-law CFG"

    def validate(self) -> None:
        if not -1.0 < self.alpha <= 10.0:
            raise PlanError(f"{self.label}: alpha must be in (−1, 10] (0 = plain CFG); got {self.alpha}")

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        step = direction.step
        factor = power_law_factor(direction.cond, direction.uncond, step.sigma, step.parameterization, self.alpha)
        scaled = [w * factor for w in weights]
        # whether the clamp at 1 took the whole step (ω ≤ 1 everywhere: the step is the conditional prediction)
        direction.state.method_state[self.KEY] = all(bool((torch.as_tensor(w) <= 1.0).all()) for w in scaled)
        return [torch.clamp(w, min=1.0) for w in scaled]

    def step_notes(self, state: GuidanceState, cond_scale: float) -> list[Note]:
        if not state.method_state.get(self.KEY):
            return []
        return [("power-law-clamped", (
            f"{self.label}: at cfg {cond_scale:g} the weight cfg·‖Δs‖^α fell to 1 or below at some steps and was "
            f"clamped at 1 there (the conditional prediction, no guidance). Raise cfg or alpha if the result is "
            f"too weak."))]
