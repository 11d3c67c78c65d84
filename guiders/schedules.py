"""Guidance-weight schedules and windows.

Paper: Wang et al., "Analysis of Classifier-Free Guidance Weight Schedulers", TMLR 2024
(arXiv 2404.13040); guidance interval: Kynkäänniemi et al., "Applying Guidance in a Limited
Interval Improves Sample and Distribution Quality", NeurIPS 2024 (arXiv 2404.07724).

A schedule gives a multiplier ``f(p)`` of a term's strength at sampling progress ``p``
(0 = first step, 1 = last; see ``progress.py``):

* for the CFG term it scales the *increment*: ``w_t = 1 + (w − 1)·f(p)``, so ``f = 0`` means the
  conditional prediction alone (never an unconditional step), and the engine then skips the
  unconditional model call;
* for an extra guidance term of scale ``s`` it gives ``s_t = s·f(p)``.

Shapes (``u`` = progress; "increasing" means increasing along the sampling direction, small
guidance at high noise):

=====================  ===========================  ==========================================
shape                  f(u) before normalisation    note
=====================  ===========================  ==========================================
constant               1                            plain CFG
linear_increasing      2u                           paper "linear"
linear_decreasing      2(1 − u)
cosine_increasing      1 − cos(πu)                  paper "cosine"
cosine_decreasing      1 + cos(πu)
power_increasing       u^k                          k = ``power``
power_decreasing       (1 − u)^k
step_list              user values, linear in u     value j at u = j/(n−1); one per step when
                                                    n equals the number of steps
=====================  ===========================  ==========================================

Every shape but ``constant`` and ``step_list`` is normalised to **mean 1 over the run's actual
step grid** u_i = i/(N−1) ("equal area", so a schedule at mean w̄ is comparable with CFG at w̄;
for linear and cosine this is exactly the paper's formula for N ≥ 2). ``step_list`` values are
taken as given.

A window restricts where the term acts (``f = 0`` outside): a progress range
``start ≤ u ≤ end`` and a sigma range ``sigma_low < σ ≤ sigma_high`` (the guidance interval;
sigma values are model-specific: eps/v models use σ up to ~15, flow models σ in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

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
        tol = 1e-9
        return (self.start - tol <= progress <= self.end + tol) and (self.sigma_low < sigma <= self.sigma_high)

    def check_reachable(self, owner: str, sigmas: list[float]) -> None:
        """Raise if no evaluated step of this run falls inside the window."""
        n = len(sigmas) - 1
        if n < 1 or self.is_full:
            return
        for i in range(n):
            p = i / (n - 1) if n > 1 else 0.0
            if self.contains(p, sigmas[i]):
                return
        raise ScheduleError(
            f"{owner}: no step of this run falls inside the window (progress {self.start:g}–{self.end:g}, "
            f"sigma ({self.sigma_low:g}, {self.sigma_high:g}]); this run's sigmas go from {sigmas[0]:.4g} "
            f"to {sigmas[max(n - 1, 0)]:.4g}. Flow models (Flux, SD3, WAN, ...) use sigma in [0, 1]; "
            f"eps/v models (SD1.5, SDXL) up to ~15. Widen the window or set it with start/end instead.")


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

    def multiplier(self, progress: float, sigma: float, n_steps: int) -> float:
        """f(p): 0 outside the window, the (normalised) shape inside."""
        if not self.window.contains(progress, sigma):
            return 0.0
        if self.shape == "constant":
            return 1.0
        if self.shape == "step_list":
            return _interpolate(self.step_values, progress)
        raw = _raw_shape(self.shape, self.power, progress)
        mean = _grid_mean(self.shape, self.power, n_steps)
        return raw / mean if mean > 0 else 1.0


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


def _raw_shape(shape: str, power: float, u: float) -> float:
    if shape == "linear_increasing":
        return 2.0 * u
    if shape == "linear_decreasing":
        return 2.0 * (1.0 - u)
    if shape == "cosine_increasing":
        return 1.0 - math.cos(math.pi * u)
    if shape == "cosine_decreasing":
        return 1.0 + math.cos(math.pi * u)
    if shape == "power_increasing":
        return u ** power
    if shape == "power_decreasing":
        return (1.0 - u) ** power
    raise ScheduleError(f"unknown schedule shape {shape}")


@lru_cache(maxsize=256)
def _grid_mean(shape: str, power: float, n_steps: int) -> float:
    if n_steps <= 1:
        return _raw_shape(shape, power, 0.0)
    return sum(_raw_shape(shape, power, i / (n_steps - 1)) for i in range(n_steps)) / n_steps


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
