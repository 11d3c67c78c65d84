"""Guidance-weight schedules and windows.

Paper: Wang et al., "Analysis of Classifier-Free Guidance Weight Schedulers", TMLR 2024
(arXiv 2404.13040); guidance interval: Kynkäänniemi et al., "Applying Guidance in a Limited
Interval Improves Sample and Distribution Quality", NeurIPS 2024 (arXiv 2404.07724).

A schedule gives a multiplier ``f(p)`` of a term's strength at sampling progress ``p``
(ComfyUI's percent of σ: 0 = pure noise, 1 = σ = 0; see ``progress.py``):

* for the CFG term it scales the *increment*: ``w_t = 1 + (w − 1)·f(p)``, so ``f = 0`` means the
  conditional prediction alone (never an unconditional step), and the engine then skips the
  unconditional model call;
* for an extra guidance term of scale ``s`` it gives ``s_t = s·f(p)``.

Shapes (``u`` = progress; "increasing" means increasing along the sampling direction, small
guidance at high noise):

=====================  ===========================  ==========================================
shape                  f(u)                         note
=====================  ===========================  ==========================================
constant               1                            plain CFG
linear_increasing      2u                           paper "linear" (w_t = 2w(1 − t/T))
linear_decreasing      2(1 − u)
cosine_increasing      1 − cos(πu)                  paper "cosine"
cosine_decreasing      1 + cos(πu)
power_increasing       (k + 1)·u^k                  k = ``power``
power_decreasing       (k + 1)·(1 − u)^k
step_list              user values, linear in u     value j at u = j/(n−1)
=====================  ===========================  ==========================================

Every shape but ``step_list`` has **mean 1 over progress 0 → 1** ("equal area", so a schedule at mean
w̄ is comparable with CFG at w̄; for linear and cosine this is the paper's formula). The mean is taken
over continuous progress, not over a step grid, so a schedule depends on σ alone and a run split over
several sampler calls gets the same weights as one call. ``step_list`` values are taken as given.

A window restricts where the term acts (``f = 0`` outside): a progress range
``start ≤ u ≤ end`` (ComfyUI's start_percent / end_percent) and a sigma range
``sigma_low < σ ≤ sigma_high`` (the guidance interval; sigma values are model-specific: eps/v models
use σ up to ~15, flow models σ in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SHAPES = (
    "constant",
    "linear_increasing",
    "linear_decreasing",
    "cosine_increasing",
    "cosine_decreasing",
    "power_increasing",
    "power_decreasing",
    "step_list",
)


class ScheduleError(ValueError):
    """A schedule or window that cannot act (empty window, bad values)."""


@dataclass(frozen=True)
class Window:
    """Where a term acts: progress in [start, end] and sigma in (sigma_low, sigma_high]."""

    start: float = 0.0
    end: float = 1.0
    sigma_low: float = 0.0
    sigma_high: float = math.inf

    def validate(self, owner: str) -> None:
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0):
            raise ScheduleError(f"{owner}: start and end are fractions of the run, between 0 and 1 "
                                f"(got start={self.start}, end={self.end})")
        if self.start > self.end:
            raise ScheduleError(f"{owner}: the window is empty: start ({self.start}) is after end ({self.end})")
        if self.sigma_low < 0:
            raise ScheduleError(f"{owner}: sigma_low must be ≥ 0 (got {self.sigma_low})")
        if self.sigma_low >= self.sigma_high:
            raise ScheduleError(f"{owner}: the sigma window is empty: sigma_low ({self.sigma_low}) "
                                f"is not below sigma_high ({self.sigma_high})")

    @property
    def is_full(self) -> bool:
        return self.start <= 0.0 and self.end >= 1.0 and self.sigma_low <= 0.0 and self.sigma_high == math.inf

    def contains(self, progress: float, sigma: float) -> bool:
        tol = 1e-6  # progress is the inverse of percent_to_sigma in float32 sigmas: equality within 1e-6
        return (self.start - tol <= progress <= self.end + tol) and (self.sigma_low < sigma <= self.sigma_high)

    def check_reachable(self, owner: str, sigmas: list[float], percents: list[float]) -> None:
        """Raise if no evaluated step of a sampler call falls inside the window (``percents``: the progress of
        each entry of ``sigmas``)."""
        if self.first_step_inside(sigmas, percents) is not None or len(sigmas) < 2:
            return
        n = len(sigmas) - 1
        raise ScheduleError(
            f"{owner}: no step of this run falls inside the window (progress {self.start:g}–{self.end:g}, "
            f"sigma ({self.sigma_low:g}, {self.sigma_high:g}]); this run's sigmas go from {sigmas[0]:.4g} "
            f"(progress {percents[0]:.3g}) to {sigmas[max(n - 1, 0)]:.4g} (progress {percents[max(n - 1, 0)]:.3g}). "
            f"Flow models (Flux, SD3, WAN, ...) use sigma in [0, 1]; eps/v models (SD1.5, SDXL) up to ~15. Widen "
            f"the window or set it with start/end instead.")

    def first_step_inside(self, sigmas: list[float], percents: list[float]) -> int | None:
        """The first evaluated step of a sampler call inside the window, or None."""
        if self.is_full:
            return 0
        for i in range(len(sigmas) - 1):
            if self.contains(percents[i], sigmas[i]):
                return i
        return None


@dataclass(frozen=True)
class Schedule:
    """A strength multiplier over sampling progress: ``shape`` × ``window``."""

    shape: str = "constant"
    power: float = 2.0
    step_values: tuple[float, ...] = ()
    window: Window = field(default_factory=Window)

    def validate(self, owner: str) -> None:
        if self.shape not in SHAPES:
            raise ScheduleError(f"{owner}: unknown schedule '{self.shape}'; choose one of {', '.join(SHAPES)}")
        if self.shape.startswith("power") and not (self.power > 0 and math.isfinite(self.power)):
            raise ScheduleError(f"{owner}: power must be a positive number (got {self.power})")
        if self.shape == "step_list":
            if not self.step_values:
                raise ScheduleError(f"{owner}: the step_list schedule needs at least one value, e.g. '1, 1, 0.5, 0'")
            if not all(math.isfinite(v) for v in self.step_values):
                raise ScheduleError(f"{owner}: step values must be finite numbers")
        self.window.validate(owner)

    @property
    def is_constant(self) -> bool:
        return self.shape == "constant" and self.window.is_full

    def multiplier(self, progress: float, sigma: float) -> float:
        """f(p): 0 outside the window, the (mean-1) shape inside."""
        if not self.window.contains(progress, sigma):
            return 0.0
        if self.shape == "constant":
            return 1.0
        if self.shape == "step_list":
            return _interpolate(self.step_values, progress)
        return shape_value(self.shape, self.power, progress)


def parse_step_values(text: str, owner: str) -> tuple[float, ...]:
    """'1, 1, 0.5, 0' (commas, spaces or newlines) → (1.0, 1.0, 0.5, 0.0)."""
    parts = [p for p in text.replace("\n", ",").replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    values = []
    for p in parts:
        try:
            values.append(float(p))
        except ValueError:
            raise ScheduleError(f"{owner}: '{p}' in step_values is not a number; write e.g. '1, 1, 0.5, 0'") from None
    return tuple(values)


def shape_value(shape: str, power: float, u: float) -> float:
    """f(u) of a built-in shape, normalised to mean 1 over u in [0, 1]."""
    u = min(max(u, 0.0), 1.0)
    if shape == "constant":
        return 1.0
    if shape == "linear_increasing":
        return 2.0 * u
    if shape == "linear_decreasing":
        return 2.0 * (1.0 - u)
    if shape == "cosine_increasing":
        return 1.0 - math.cos(math.pi * u)
    if shape == "cosine_decreasing":
        return 1.0 + math.cos(math.pi * u)
    if shape == "power_increasing":
        return (power + 1.0) * u ** power
    if shape == "power_decreasing":
        return (power + 1.0) * (1.0 - u) ** power
    raise ScheduleError(f"unknown schedule shape {shape}")


def _interpolate(values: tuple[float, ...], u: float) -> float:
    if len(values) == 1:
        return values[0]
    pos = min(max(u, 0.0), 1.0) * (len(values) - 1)
    j = min(int(pos), len(values) - 2)
    t = pos - j
    return values[j] * (1.0 - t) + values[j + 1] * t


def beta_pdf(t: float, a: float, b: float) -> float:
    """Density of Beta(a, b) at t (scipy.stats.beta.pdf), for a, b ≥ 1 and t in [0, 1]."""
    if a < 1 or b < 1:
        raise ScheduleError(f"beta curve needs a ≥ 1 and b ≥ 1 (got a={a}, b={b})")
    t = min(max(t, 0.0), 1.0)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    if (t == 0.0 and a > 1) or (t == 1.0 and b > 1):
        return 0.0
    log_t = 0.0 if a == 1 else (a - 1) * math.log(t)
    log_1t = 0.0 if b == 1 else (b - 1) * math.log(1.0 - t)
    return math.exp(log_norm + log_t + log_1t)


def beta_peak(a: float, b: float) -> float:
    """max_t Beta(a, b) density (at the mode), used for the optional normalised β curve."""
    if a == 1 and b == 1:
        return 1.0
    if a == 1:
        return beta_pdf(0.0, a, b)
    if b == 1:
        return beta_pdf(1.0, a, b)
    return beta_pdf((a - 1) / (a + b - 2), a, b)
