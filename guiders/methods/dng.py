"""DNG · Dynamic Negative Guidance: a negative prompt whose weight follows the model's running estimate of the
posterior probability that the sample is what the negative prompt describes (stage 3, an extra term with its
own branch: the model under the negative prompt, in the same batched call).

Paper: Koulischer, Deleu, Raya, Demeester, Ambrogioni, "Dynamic Negative Guidance of Diffusion Models", ICLR
2025 (arXiv 2410.14398); official code FelixKoulischer/Dynamic-Negative-Guidance, ``utils/Generate_Batch*.py``
(``gen_batch_DNG``, ``compute_posterior_DNG``, Algorithm 1), followed here. With U the sampler's uncond, N the
negative prompt's prediction and p the posterior of the negative per sample (the prior p₀ at a call's first
step):

    λ_t  = λ·p/(1 − p)
    D̂   += −λ_t·(N − U)                            (the official ε_u − λ_t(ε_neg − ε_u), linear: the same in x0)
    p    ← clamp(p·exp((−τ·(‖x_s − μ(N)‖² − ‖x_s − μ(U)‖²) + δ)/(2σ̃²)),  p_min,  p_max)

after each step x_t → x_s (``posterior.py``'s kernel; the official code's is the DDPM ancestral step, written
here in the k-diffusion form every ComfyUI sampler moves in). A sample moving towards the negative raises p
and the negative's weight; one far from it is left alone (p stays near the prior). Defaults: the official
README's example (λ = 5, p₀ = 0.01, τ = 0.2, δ = 2e-4, p_max = 0.8; p_min 1e-6 as the code).

The posterior is kept over the evaluations of one sampler call (run state; it restarts at each call). At cfg 1
the term still acts and needs the uncond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..plan import Branch, CfgOne, GuidancePlan, PlanError, ScheduledExtraTerm
from ..schedules import Schedule
from ..tensor_ops import to_f32
from .posterior import Transition, squared_distance_difference

if TYPE_CHECKING:
    from ..step import GuidanceState, StepInputs


def update_posterior(posterior: torch.Tensor, difference: torch.Tensor, variance: float, temperature: float,
                     offset: float, p_min: float, p_max: float) -> torch.Tensor:
    """The official ``compute_posterior_DNG`` update of p from the distance difference of one step."""
    updated = posterior * torch.exp((-temperature * difference + offset) / (2.0 * variance))
    return updated.clamp(p_min, p_max)


def negative_weight(posterior: torch.Tensor, scale: float) -> torch.Tensor:
    """λ_t = λ·p/(1 − p)."""
    return scale * posterior / (1.0 - posterior)


@dataclass
class DngState:
    posterior: torch.Tensor
    last: Transition | None = None


@dataclass(frozen=True)
class DynamicNegativeGuidance(ScheduledExtraTerm):
    """DNG's settings; ``branch`` is the model under the node's negative prompt."""

    KEY = "dng"
    SINGLETON = True
    AT_CFG_ONE = CfgOne.NEEDS_UNCOND

    branch: Branch
    scale: float = 5.0
    prior: float = 0.01
    temperature: float = 0.2
    offset: float = 2e-4
    p_min: float = 1e-6
    p_max: float = 0.8
    schedule: Schedule = field(default_factory=Schedule)
    label: str = "DNG"

    def validate(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise PlanError(f"{self.label}: scale must be ≥ 0 (0 = off); got {self.scale}")
        if not 0.0 < self.p_min <= self.prior <= self.p_max < 1.0:
            raise PlanError(f"{self.label}: need 0 < p_min ≤ prior ≤ p_max < 1 (the posterior's clamp and start); got "
                            f"p_min {self.p_min}, prior {self.prior}, p_max {self.p_max}")
        if not (self.temperature >= 0 and math.isfinite(self.offset)):
            raise PlanError(f"{self.label}: temperature must be ≥ 0 and offset finite")
        self.schedule.validate(self.label)


    def _state(self, inp: StepInputs, state: GuidanceState) -> DngState:
        found = state.method_state.get(self.KEY)
        batch = inp.x.shape[0]
        if isinstance(found, DngState) and found.posterior.shape[0] == batch:
            return found
        created = DngState(torch.full((batch,), self.prior, dtype=torch.float32, device=inp.x.device))
        state.method_state[self.KEY] = created
        return created

    def add_to(self, guided: torch.Tensor, inp: StepInputs, state: GuidanceState,
               plan: GuidancePlan) -> torch.Tensor:
        scale = self.scale_at(inp.position, inp.sigma_value)
        if scale == 0.0 or inp.uncond is None:
            return guided
        name = self.branch.name
        if name not in inp.branches:
            if plan.branch_stopped(state, name):
                return guided
            raise KeyError(f"{self.label}: the prediction of the negative prompt (branch {name!r}) is missing")
        negative, uncond = to_f32(inp.branches[name]), to_f32(inp.uncond)
        tracked = self._state(inp, state)
        sigma = inp.sigma_value
        last = tracked.last
        if last is not None and last.step_to(inp.x, sigma):
            difference, variance = squared_distance_difference(last.x, inp.x, last.first, last.second, last.sigma,
                                                               sigma, inp.parameterization)
            if variance > 0:
                tracked.posterior = update_posterior(tracked.posterior, difference, variance, self.temperature,
                                                     self.offset, self.p_min, self.p_max)
        if last is None or sigma != last.sigma:
            tracked.last = Transition(to_f32(inp.x), sigma, negative, uncond)
        weight = negative_weight(tracked.posterior, scale).reshape(-1, *([1] * (inp.x.ndim - 1)))
        return guided - weight * (negative - uncond)
