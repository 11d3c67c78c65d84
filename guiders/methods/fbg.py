"""FBG · Feedback Guidance: a per-sample CFG weight from the model's own running estimate of how well the
sample already fits the condition (stage 2, a weight factor that sets the weight).

Paper: Koulischer, Handke, Deleu, Demeester, Ambrogioni, "Feedback Guidance of Diffusion Models", NeurIPS 2025
(arXiv 2506.06085); official code FelixKoulischer/FBG_using_edm2, ``generate_images_FBG.py`` (``edm_sampler``,
``update_log_posterior``, ``delta_from_t0``, ``Temp_from_t1``), followed here. Per sample, a log posterior
ratio L (0 at the first step of a call) sets the weight

    λ = e^L / (e^L − (1 − π))                      (π: how conditional the data is assumed to be)

and after each step x_t → x_s it is updated from the step the sampler took (``posterior.py``'s kernel):

    L ← clamp(L − τ/(2σ̃²)·(‖x_s − μ(C)‖² − ‖x_s − μ(U)‖²) + δ,  log((1 − π)·λ_max/(λ_max − 1)),  3)

A sample that follows the conditional prediction keeps L high and the weight near 1; one that drifts towards
the unconditional one lowers L and gets more guidance (up to λ_max). The offset δ < 0 and temperature τ come
from t₀ (the fraction of the run after which λ would reach 3 from the offset alone) and t₁ (where the
temperature term balances it), over the sampler call's own sigmas, as the official code derives them from
its EDM schedule: δ = log((1 − π)·3/2)/((1 − t₀)·N), τ = |2·σ̃²(t₁)·δ/10|; set τ > 0 to give both by hand.
"hybrid" adds the sampler's CFG on top (``λ + (w − 1)``, the official Hybrid_CFG_FBG, with λ_max reduced by
w − 1 in the clamp); "fbg" uses λ alone and ignores the sampler's cfg.

The posterior is kept over the evaluations of one sampler call (run state; it restarts at each call, and δ, τ
are derived from that call's sigmas). The comparison uses the cond and uncond as evaluated (before stage-1
rewrites). Evaluations at the same σ (second-order samplers' corrector) keep the weight of the step, as the
official Heun sampler; the posterior moves from one σ to the next lower one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, Note, PlanError, WeightFactor
from ..tensor_ops import to_f32
from .posterior import Transition, squared_distance_difference, transition_variance

if TYPE_CHECKING:
    from ..step import DirectionInputs

FBG_MODES = ("fbg", "hybrid")
REFERENCE_SCALE = 3.0  # λ_ref of the official delta_from_t0
TEMPERATURE_RATIO = 10.0  # α of the official Temp_from_t1
LOG_POSTERIOR_MAX = 3.0


def offset_from_t0(n_steps: int, pi: float, t0: float) -> float:
    """δ: the official ``delta_from_t0`` (λ_ref = 3)."""
    return math.log((1.0 - pi) * REFERENCE_SCALE / (REFERENCE_SCALE - 1.0)) / ((1.0 - t0) * n_steps)


def transition_variances(sigmas: tuple[float, ...] | list[float], parameterization: str) -> list[float]:
    """σ̃² of the call's transitions, indexed as the official ``get_sigma_square_tilde`` (the last sigma, 0, left
    out; index N − 1 − i for the step i → i + 1; index 0 stays 0)."""
    levels = list(sigmas[:-1]) if sigmas and sigmas[-1] == 0 else list(sigmas)
    n = len(levels)
    out = [0.0] * n
    for i in range(n - 1):
        out[n - 1 - i] = transition_variance(levels[i], levels[i + 1], parameterization)
    return out


def temperature_from_t1(variances: list[float], offset: float, t1: float) -> float:
    """τ: the official ``Temp_from_t1`` (α = 10), σ̃² interpolated at t₁·N."""
    n = len(variances)
    position = t1 * n
    lower = min(int(math.floor(position)), n - 1)
    upper = min(lower + 1, n - 1)
    a = position - lower
    variance = (1.0 - a) * variances[lower] + a * variances[upper]
    return abs(2.0 * variance / TEMPERATURE_RATIO * offset)


def fbg_scale(log_posterior: torch.Tensor, pi: float) -> torch.Tensor:
    """λ = e^L / (e^L − (1 − π))."""
    e = torch.exp(log_posterior)
    return e / (e - (1.0 - pi))


@dataclass
class FbgState:
    """One sampler call's posterior: L per sample, the last evaluation, and the call's δ and τ."""

    log_posterior: torch.Tensor
    offset: float
    temperature: float
    last: Transition | None = None


@dataclass(frozen=True)
class FeedbackGuidance(WeightFactor):
    """FBG's settings (the official defaults: π = 0.95, t₀ = 0.5, t₁ = 0.4, λ_max = 10)."""

    KEY = "fbg"
    ORDER = 0  # sets the weight; β-CFG's and S-CFG's factors multiply it afterwards
    AT_CFG_ONE = CfgOne.NEEDS_UNCOND

    pi: float = 0.95
    t0: float = 0.5
    t1: float = 0.4
    max_scale: float = 10.0
    mode: str = "fbg"
    temperature: float = 0.0  # > 0: τ and ``offset`` given by hand instead of derived from t₀, t₁
    offset: float = 0.0
    label: str = "FBG"

    def validate(self) -> None:
        if not 0.0 < self.pi < 1.0:
            raise PlanError(f"{self.label}: pi must be in (0, 1) (the official default 0.95); got {self.pi}")
        if not (0.0 <= self.t0 < 1.0 and 0.0 <= self.t1 < 1.0):
            raise PlanError(f"{self.label}: t_0 and t_1 are fractions of the run in [0, 1); got {self.t0}, {self.t1}")
        if not self.max_scale > 1.0:
            raise PlanError(f"{self.label}: max_guidance must be > 1 (the official default 10); got {self.max_scale}")
        if self.mode not in FBG_MODES:
            raise PlanError(f"{self.label}: mode must be one of {', '.join(FBG_MODES)}; got {self.mode!r}")
        if self.temperature < 0 or not math.isfinite(self.offset):
            raise PlanError(f"{self.label}: temperature must be ≥ 0 (0 = derived from t_0, t_1) and offset finite")

    def minimal_log_posterior(self, cond_scale: float) -> float:
        top = self.max_scale - (cond_scale - 1.0 if self.mode == "hybrid" else 0.0)
        if top <= 1.0:
            raise PlanError(f"{self.label}: in hybrid mode max_guidance ({self.max_scale:g}) must exceed the sampler's "
                            f"cfg ({cond_scale:g}); raise max_guidance or lower cfg")
        return math.log((1.0 - self.pi) * top / (top - 1.0))

    def _state(self, direction: DirectionInputs) -> FbgState:
        step = direction.step
        found = direction.state.method_state.get(self.KEY)
        batch = step.x.shape[0]
        if isinstance(found, FbgState) and found.log_posterior.shape[0] == batch:
            return found
        if self.temperature > 0:
            offset, temperature = self.offset, self.temperature
        else:
            sigmas = step.position.call_sigmas
            if len(sigmas) < 3:
                raise PlanError(f"{self.label}: this sampler did not publish its sigmas, which FBG needs to derive its "
                                f"temperature and offset; set temperature > 0 and offset on the node")
            n_steps = len(sigmas) - 1
            offset = offset_from_t0(n_steps, self.pi, self.t0)
            temperature = temperature_from_t1(transition_variances(sigmas, step.parameterization), offset, self.t1)
        created = FbgState(torch.zeros(batch, dtype=torch.float32, device=step.x.device), offset, temperature)
        direction.state.method_state[self.KEY] = created
        return created

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        step = direction.step
        state = self._state(direction)
        sigma = step.sigma_value
        cond, uncond = to_f32(step.cond), to_f32(step.uncond)
        last = state.last
        if last is not None and last.step_to(step.x, sigma):
            difference, variance = squared_distance_difference(last.x, step.x, last.first, last.second, last.sigma,
                                                               sigma, step.parameterization)
            if variance > 0:
                updated = state.log_posterior - state.temperature / (2.0 * variance) * difference + state.offset
                state.log_posterior = updated.clamp(self.minimal_log_posterior(step.cond_scale), LOG_POSTERIOR_MAX)
        if last is None or sigma != last.sigma:
            state.last = Transition(to_f32(step.x), sigma, cond, uncond)
        scale = fbg_scale(state.log_posterior, self.pi).reshape(-1, *([1] * (step.x.ndim - 1)))
        if self.mode == "hybrid":
            return [scale + (w - 1.0) for w in weights]
        return [scale for _ in weights]

    def cfg_notes(self, cond_scale: float) -> list[Note]:
        if self.mode == "hybrid" or math.isclose(cond_scale, 1.0):
            return []
        return [("fbg-ignores-cfg", f"{self.label}: the sampler's cfg ({cond_scale:g}) does not change the guidance: "
                                    f"FBG sets its own weight per sample (1 to max_guidance {self.max_scale:g}). Set "
                                    f"mode to 'hybrid' to add cfg − 1 on top.")]
