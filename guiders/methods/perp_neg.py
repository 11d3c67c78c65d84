"""Perp-Neg · a negative prompt projected perpendicular to the positive direction (stage 3, an extra term
with its own branch: the model under the negative prompt, in the same batched call).

Paper: Armandpour, Sadeghian, Zheng, Sadeghian, Zhou, "Re-imagine the Negative Prompt Algorithm: Transform 2D
Diffusion into 3D, alleviate Janus problem and Beyond", arXiv 2304.04968 (2023), eq. 7 with one negative prompt;
ComfyUI core's ``perp_neg`` (comfy_extras/nodes_perpneg.py, PerpNegGuider) computes it on denoised (x0)
predictions. With C the prompt, U the sampler's uncond (the empty prompt) and N the negative prompt:

    g⁺   = C − U,     g⁻ = N − U
    g⁻⊥  = g⁻ − (⟨g⁻, g⁺⟩ / ‖g⁺‖²)·g⁺          (per sample; core sums over the whole batch)
    D̂   += −w·s_t·g⁻⊥,  s_t = s·f(p)          (w: the sampler's cfg, as core: its result is
                                                 U + w·(g⁺ − s·g⁻⊥); s_t: the term's scale and schedule)

The term is added after the CFG direction, so every stage-1/2 method (CFG-Zero*'s α*, APG, β-CFG, ...) shapes
the CFG part while the negative only removes what is orthogonal to the prompt's direction: the rest of the
plan stays as it is (core's PerpNegGuider hands CFG-Zero* the negative as the uncond, which breaks it). The
projection uses the uncond as evaluated (before stage-1 rewrites). At cfg 1 the term still acts (core
evaluates all three there too) and needs the uncond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..plan import Branch, CfgOne, GuidancePlan, PlanError, ScheduledExtraTerm
from ..schedules import Schedule
from ..tensor_ops import batch_dot, safe_divide, to_f32

if TYPE_CHECKING:
    from ..step import GuidanceState, StepInputs


def perpendicular_negative(cond: torch.Tensor, uncond: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """g⁻⊥: the component of N − U orthogonal to C − U, per sample (float32; 0 where C = U)."""
    positive = to_f32(cond) - to_f32(uncond)
    negative = to_f32(negative) - to_f32(uncond)
    coefficient = safe_divide(batch_dot(negative, positive), batch_dot(positive, positive))
    return negative - coefficient * positive


def perp_neg_step(cond: torch.Tensor, uncond: torch.Tensor, negative: torch.Tensor, cfg: float,
                  neg_scale: float) -> torch.Tensor:
    """Perp-Neg's guided prediction alone: ``U + w·(C − U) − w·s·g⁻⊥`` (float32)."""
    uncond32 = to_f32(uncond)
    return uncond32 + cfg * (to_f32(cond) - uncond32) - cfg * neg_scale * perpendicular_negative(cond, uncond,
                                                                                                   negative)


@dataclass(frozen=True)
class PerpNeg(ScheduledExtraTerm):
    """Perp-Neg's settings; ``branch`` is the model under the node's negative prompt."""

    KEY = "perp_neg"
    SINGLETON = True
    AT_CFG_ONE = CfgOne.NEEDS_UNCOND

    branch: Branch
    neg_scale: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    label: str = "Perp-Neg"

    def validate(self) -> None:
        if not (math.isfinite(self.neg_scale) and self.neg_scale >= 0):
            raise PlanError(f"{self.label}: neg_scale must be ≥ 0 (0 = off; core's default 1); got {self.neg_scale}")
        self.schedule.validate(self.label)

    def strength(self) -> float:
        return self.neg_scale

    def add_to(self, guided: torch.Tensor, inp: StepInputs, state: GuidanceState,
               plan: GuidancePlan) -> torch.Tensor:
        scale = self.scale_at(inp.position, inp.sigma_value)
        if scale == 0.0 or inp.uncond is None:
            return guided  # no uncond at this step (outside the CFG window): no positive direction to project on
        name = self.branch.name
        if name not in inp.branches:
            if plan.branch_stopped(state, name):
                return guided
            raise KeyError(f"{self.label}: the prediction of the negative prompt (branch {name!r}) is missing")
        perpendicular = perpendicular_negative(inp.cond, inp.uncond, inp.branches[name])
        return guided - inp.cond_scale * scale * perpendicular
