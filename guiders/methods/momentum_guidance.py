"""Momentum Guidance · the guided velocity extrapolated away from its running average (stage 3, a term without
a branch, after the additive terms).

Paper: Liao, Yu, Su, Zhang, Chen, Liu, "Momentum Guidance: Plug-and-Play Guidance for Flow Models",
arXiv 2602.20360 (Algorithm 1: an EMA weight β ∈ [0, 1) and a weight α ≥ 0; its steps could not be read
here and no official code was found). The rule as the paper's abstract states it and as the one public
implementation found (Duanyll/flow-control, ``samplers/momentum.py``, ``MomentumGuidedSampler``) writes it, per
model evaluation with v the velocity the sampler would use:

    m ← v at the first evaluation of the run
    v̂ = v + α·(v − m)                  (extrapolated away from the average of the past velocities)
    m ← (1 − β)·v + β·m

In the plan v = (x − D̂)/σ of the whole guided prediction so far (CFG and every stage before it: the velocity
on flow models, ε on eps/v models, where the paper did not test it), so ``D̂ ← D̂ − σ·α·(v − m)``. It needs no
extra model call and acts at cfg 1 (the paper's use without CFG). The average lives in the run state: it
restarts with every sampler call (a split run differs from one call); every model evaluation of a
multi-evaluation sampler (Heun, DPM++ 2S) updates it, as in the reference's sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import ExtraTerm, PlanError
from ..tensor_ops import per_sample, to_f32

if TYPE_CHECKING:
    from ..plan import Branch, GuidancePlan
    from ..progress import StepPosition
    from ..step import GuidanceState, StepInputs


def momentum_extrapolation(velocity: torch.Tensor, average: torch.Tensor | None, alpha: float, beta: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(v̂, the new average) for velocity v and the running average m (None at the first evaluation)."""
    velocity = to_f32(velocity)
    if average is None:
        average = velocity
    elif average.shape != velocity.shape:
        raise ValueError(f"Momentum Guidance's average has shape {tuple(average.shape)} but the prediction has "
                         f"{tuple(velocity.shape)}; the batch changed within a sampling run")
    return velocity + alpha * (velocity - average), (1.0 - beta) * velocity + beta * average


@dataclass(frozen=True)
class MomentumGuidance(ExtraTerm):
    """Momentum Guidance's settings: α (extrapolation weight) and β (EMA decay)."""

    KEY = "momentum_guidance"
    ORDER = 100  # after the additive terms (PAG, Autoguidance, ...): it extrapolates the whole guided velocity
    SINGLETON = True

    alpha: float = 0.5
    beta: float = 0.5
    label: str = "Momentum Guidance"

    def validate(self) -> None:
        if self.alpha < 0.0:
            raise PlanError(f"{self.label}: alpha must be ≥ 0 (0 = off); got {self.alpha}")
        if not 0.0 <= self.beta < 1.0:
            raise PlanError(f"{self.label}: beta (the EMA decay) must be in [0, 1); got {self.beta}")

    def branches_at(self, position: StepPosition, sigma: float) -> tuple[Branch, ...]:
        return ()

    def add_to(self, guided: torch.Tensor, inp: StepInputs, state: GuidanceState,
               plan: GuidancePlan) -> torch.Tensor:
        sigma = per_sample(inp.sigma, guided)
        x = to_f32(inp.x)
        velocity = (x - to_f32(guided)) / sigma
        extrapolated, state.momentum[self.KEY] = momentum_extrapolation(velocity, state.momentum.get(self.KEY),
                                                                        self.alpha, self.beta)
        return x - sigma * extrapolated
