"""ICG · Independent Condition Guidance: the unconditional branch is evaluated under a condition
independent of the prompt (stage 1, the uncond's source).

Paper: Sadat, Kansy, Hilliges, Weber, "No Training, No Problem: Rethinking Classifier-Free Guidance for
Diffusion Models", ICLR 2025 (arXiv 2407.02687):

    D̂ = C_ind + w·(C − C_ind)

``branch.perturbation`` rewrites the conditioning of the uncond entry (``nodes/contributors/condition.py``),
which takes the uncond's place in the batched call (no extra call). Every later stage is unchanged, so ICG
stacks with APG, TCFG, schedules and extra terms; it excludes every other uncond source.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import Branch, PlanError, UncondSource
from ..progress import StepPosition


@dataclass(frozen=True)
class IndependentCondition(UncondSource):
    KEY = "icg"

    branch: Branch
    label: str = "ICG"

    def validate(self) -> None:
        if self.branch.source != "cond":
            raise PlanError(f"{self.label}: the independent condition is derived from the prompt's conditioning")

    def uncond_source(self, position: StepPosition, sigma: float,
                      uncond: bool) -> tuple[Branch | None, tuple[Branch, ...]]:
        return self.branch, ()  # wherever the uncond is evaluated, it is evaluated as this branch

    def uncond_branches(self) -> tuple[Branch, ...]:
        return (self.branch,)
