"""Where a model evaluation sits in the sampling run.

Guidance schedules, windows and progress values use **ComfyUI's percent convention**: the progress of
an evaluation at noise level σ is ``p = percent(σ)``, the inverse of the model's
``model_sampling.percent_to_sigma`` (0 at the model's σ_max, i.e. pure noise; 1 at σ = 0). It is a
function of σ alone, so

* a run split over several sampler calls (KSamplerAdvanced 0–10 then 10–20, base → refiner, a hires-fix
  second pass, SamplerCustomAdvanced with SplitSigmas) gets the same guidance at the same σ as one call;
* ``start_percent`` / ``end_percent`` mean what they mean on ComfyUI's own nodes (core PAG, SkipLayerGuidance,
  ConditioningSetTimestepRange): the same percent ↔ σ mapping;
* it is the same on eps/v models (σ up to ~15) and on flow models (σ in [0, 1]) and for every scheduler.

On discrete eps/v models ``percent = 1 − t/999`` with t the model's timestep of σ, so a schedule written
over progress is written over the timestep, as the CFG-schedule papers write theirs (w(t) linear in t).

The step index inside the current sampler call is kept for what is genuinely per call: CFG-Zero*'s
zero-init (the first steps of a call that starts from pure noise) and messages. Per-step random draws
(S²-Guidance's dropped blocks, TPG's permutation, TSG's noise) are keyed by σ (``sigma_key``), not by the
step index, so they too are the same in a split run.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# A sampler call "starts from pure noise" when its first σ is within this share of the run from σ_max
# (every ComfyUI scheduler but ddim_uniform starts exactly at σ_max; a second pass or img2img does not).
FROM_NOISE_PERCENT = 0.02

PercentToSigma = Callable[[float], float]


@dataclass(frozen=True)
class StepPosition:
    """A model evaluation's place in the run.

    ``progress``: ComfyUI percent of σ (0 = σ_max / pure noise, 1 = σ = 0), the same in a split run.
    ``step``: fractional index into the current sampler call's sigmas (0 = its first step).
    ``n_steps``: steps of the current sampler call. ``from_noise``: the call started at the model's σ_max.
    """

    progress: float
    step: float = 0.0
    n_steps: int = 1
    from_noise: bool = True
    call_sigmas: tuple[float, ...] = ()  # the current sampler call's sigmas (empty when none were published)

    @property
    def step_index(self) -> int:
        """The step of this call the evaluation belongs to (evaluations inside a step count as that step)."""
        return int(self.step + 1e-6)


def percent_of_sigma(sigma: float, percent_to_sigma: PercentToSigma, tolerance: float = 1e-9) -> float:
    """Invert a (decreasing) ``percent_to_sigma`` by bisection: the percent at which the model is at ``sigma``.

    Works for every ComfyUI model_sampling (discrete, flow with any shift, Flux, EDM, ...) through its own
    ``percent_to_sigma`` only. ``sigma`` at or above the model's σ_max gives 0, σ ≤ 0 gives 1.
    """
    sigma = float(sigma)
    if not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number (got {sigma})")
    if sigma <= 0.0:
        return 1.0
    low, high = 0.0, 1.0  # percent_to_sigma(low) ≥ σ > percent_to_sigma(high)
    if float(percent_to_sigma(tolerance)) <= sigma:
        return 0.0
    while high - low > tolerance:
        middle = 0.5 * (low + high)
        if float(percent_to_sigma(middle)) >= sigma:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def step_in_call(sigmas: Sequence[float], sigma: float) -> float:
    """Fractional index of ``sigma`` in a descending sigma schedule (as passed to a sampler).

    ``sigmas`` has N + 1 entries for N steps (the last usually 0). An exact match of schedule point ``i``
    gives ``i``; a sigma between points ``i`` and ``i + 1`` (Heun, DPM-2, DPM++ 2S, ...) gives
    ``i + (sigmas[i] − σ) / (sigmas[i] − sigmas[i + 1])``. A sigma above the first point (Euler with churn)
    is 0; one below the last evaluated point is the last step.
    """
    n = len(sigmas) - 1
    if n < 1:
        raise ValueError("a sigma schedule needs at least two entries")
    if sigma >= sigmas[0]:
        return 0.0
    for i in range(n):
        hi, lo = sigmas[i], sigmas[i + 1]
        if hi >= sigma >= lo:
            if sigma == hi or hi == lo:
                return float(i)
            if sigma == lo and i + 1 < n:
                return float(i + 1)
            return i + (hi - sigma) / (hi - lo)
    return float(n - 1)


def step_position(sigmas: Sequence[float], sigma: float, percent_to_sigma: PercentToSigma) -> StepPosition:
    """The position of an evaluation at ``sigma`` in a sampler call over ``sigmas``, for a model whose
    percent ↔ σ mapping is ``percent_to_sigma``."""
    return StepPosition(progress=percent_of_sigma(sigma, percent_to_sigma), step=step_in_call(sigmas, sigma),
                        n_steps=len(sigmas) - 1, from_noise=starts_from_noise(sigmas, percent_to_sigma),
                        call_sigmas=tuple(float(s) for s in sigmas))


def starts_from_noise(sigmas: Sequence[float], percent_to_sigma: PercentToSigma) -> bool:
    """Whether a sampler call over ``sigmas`` starts from pure noise (the model's σ_max), as a first or only
    pass does; a second pass of a split run, a refiner or img2img (denoise < 1) does not."""
    return len(sigmas) > 0 and percent_of_sigma(sigmas[0], percent_to_sigma) <= FROM_NOISE_PERCENT


def sigma_key(sigma: float) -> int:
    """A process-independent integer for a noise level: the float32 bits of σ. Seeds per-step random draws
    so that the same σ draws the same numbers in one call and in a split run."""
    return struct.unpack("<I", struct.pack("<f", float(sigma)))[0]


# ComfyUI's percent conventions, for code without a ComfyUI model (the exact-mixture benchmark, tests).

def log_linear_percent_to_sigma(sigma_min: float, sigma_max: float) -> PercentToSigma:
    """ModelSamplingContinuousEDM's convention: log σ linear in percent between σ_max and σ_min."""
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)

    def percent_to_sigma(percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return math.exp((log_max - log_min) * (1.0 - percent) + log_min)

    return percent_to_sigma


def flow_percent_to_sigma(shift: float = 1.0) -> PercentToSigma:
    """ModelSamplingDiscreteFlow's convention: σ = shift·t / (1 + (shift − 1)·t) with t = 1 − percent."""

    def percent_to_sigma(percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent
        return shift * t / (1.0 + (shift - 1.0) * t)

    return percent_to_sigma
