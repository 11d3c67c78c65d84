"""Extra guidance terms · perturbation guidance (PAG, SEG, TPG, SLG/STG, S²-Guidance, TSG) and
Autoguidance (stage 3): one term per degraded branch B, each evaluated in the same batched call.

    D̂ += s_t·(C − B),    s_t = s·f(p) (the term's schedule; 0 outside its window: B is not evaluated)

Papers: Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance", ECCV 2024 (the
form); Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024 (B from a weaker
model). ``branch.perturbation`` (opaque here) says how B differs from C; the terms are additive and summed in
chain order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..plan import Branch, GuidancePlan, PlanError, ScheduledExtraTerm
from ..schedules import Schedule
from ..tensor_ops import to_f32

if TYPE_CHECKING:
    from ..step import GuidanceState, StepInputs


@dataclass(frozen=True)
class ExtraGuidance(ScheduledExtraTerm):
    KEY = "extra"

    branch: Branch
    scale: float
    schedule: Schedule = field(default_factory=Schedule)
    label: str = "extra guidance"

    def instance_key(self) -> str:
        return self.branch.name

    def validate(self) -> None:
        if not math.isfinite(self.scale):
            raise PlanError(f"{self.label}: scale must be a finite number")
        self.schedule.validate(self.label)


    def add_to(self, guided: torch.Tensor, inp: StepInputs, state: GuidanceState,
               plan: GuidancePlan) -> torch.Tensor:
        scale = self.scale_at(inp.position, inp.sigma_value)
        if scale == 0.0:
            return guided
        name = self.branch.name
        if name not in inp.branches:
            if plan.branch_stopped(state, name):
                return guided  # Adaptive Guidance switched this branch off: the term is done for this run
            raise KeyError(f"{self.label}: the prediction of branch {name!r} is missing")
        return guided + scale * (to_f32(inp.cond) - to_f32(inp.branches[name]))
