"""Second-model uncond · Unconditional Priors, Diffusion-NPO, Personalization Guidance: CFG's
unconditional prediction taken (partly) from another model (stage 1, the uncond's source and a rewrite).

Papers: Phunyaphibarn et al., "Unconditional Priors Matter! Improving Conditional Generation of Fine-Tuned
Diffusion Models", arXiv 2503.20240; Wang et al., "Diffusion-NPO: Negative Preference Optimization for
Better Preference Aligned Generation of Diffusion Models", ICLR 2025; Park et al., "Steering Guidance for
Personalized Text-to-Image Diffusion Models", ICCV 2025. With β_t = scale·f(p) inside the window, 0 outside:

    U' = U + β_t·(U_other − U)

``branch`` is evaluated with the uncond's conditioning on the other model (``branch.perturbation`` says
which: a second checkpoint, or LoRA rows on the same weights; opaque here). At β_t = 1 (the papers'
setting) the other model's prediction *is* the uncond and the sampled model's own uncond is not
evaluated; at β_t = 0 only the sampled model's uncond runs; in between both run and are blended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..plan import Branch, PlanError, UncondRewrite, UncondSource
from ..progress import StepPosition
from ..schedules import Schedule
from ..tensor_ops import to_f32

if TYPE_CHECKING:
    from ..step import StepInputs


@dataclass(frozen=True)
class UncondModel(UncondSource, UncondRewrite):
    KEY = "uncond_model"
    ORDER = 0  # the blend comes first: TCFG and CFG-Zero* rewrite the blended uncond

    branch: Branch
    scale: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    label: str = "second-model uncond"

    def validate(self) -> None:
        if not (math.isfinite(self.scale) and 0.0 <= self.scale <= 2.0):
            raise PlanError(f"{self.label}: scale is the share of the other model's uncond in [0, 2] (1 = replace the "
                            f"uncond, as the paper; 0 = off); got {self.scale}")
        if self.branch.source != "uncond":
            raise PlanError(f"{self.label}: the other model is evaluated with the negative/empty prompt (source "
                            f"'uncond'); got {self.branch.source!r}")
        self.schedule.validate(self.label)

    def weight_at(self, position: StepPosition, sigma: float) -> float:
        if self.scale == 0:
            return 0.0
        return self.scale * self.schedule.multiplier(position.progress, sigma)

    def uncond_source(self, position: StepPosition, sigma: float,
                      uncond: bool) -> tuple[Branch | None, tuple[Branch, ...]]:
        if not uncond:
            return None, ()
        beta = self.weight_at(position, sigma)
        if beta == 1.0:
            return self.branch, ()  # the other model's uncond replaces the uncond entry (no extra call)
        if beta != 0.0:
            return None, (self.branch,)  # both run; blended by ``rewrite_uncond``
        return None, ()

    def uncond_branches(self) -> tuple[Branch, ...]:
        return (self.branch,)

    def rewrite_uncond(self, inp: StepInputs, uncond: torch.Tensor) -> torch.Tensor:
        """The blend when both were evaluated (0 < β_t ≠ 1); at β_t = 1 the uncond entry already is the other
        model's (``Needs.uncond_branch``)."""
        if self.branch.name not in inp.branches:
            return uncond
        beta = self.weight_at(inp.position, inp.sigma_value)
        if beta == 0.0 or beta == 1.0:
            return uncond
        other = inp.branches[self.branch.name]
        return (to_f32(uncond) + beta * (to_f32(other) - to_f32(uncond))).to(uncond.dtype)

    def windows(self) -> tuple[tuple[str, Schedule], ...]:
        return ((self.label, self.schedule),)
