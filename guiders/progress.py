"""Where a model evaluation sits in the sampling schedule.

Guidance schedules are written over *sampling progress* ``p`` in [0, 1]: ``p = 0`` at the first
(noisiest) step and ``p = 1`` at the last one, ``p = i / (N - 1)`` at step ``i`` of ``N``
(the convention of the CFG-schedule and β-CFG papers: τ = step / (N − 1)). It is read from the
sampler's sigma schedule, never from a 0–999 timestep, so it is the same on eps/v models
(σ up to ~15) and on flow models (σ in [0, 1]), and it follows any scheduler (Karras,
exponential, beta, ...) exactly. Samplers that evaluate the model between two schedule points
(Heun, DPM-2, DPM++ 2S, ...) get a fractional step position interpolated in σ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPosition:
    """A model evaluation's place in the run: fractional step index and progress."""

    step: float  # fractional index into the schedule, 0 = first step
    n_steps: int  # number of steps of the run (len(sigmas) - 1)

    @property
    def progress(self) -> float:
        if self.n_steps <= 1:
            return 0.0
        return min(max(self.step / (self.n_steps - 1), 0.0), 1.0)

    @property
    def step_index(self) -> int:
        """The step this evaluation belongs to (evaluations inside a step count as that step)."""
        return int(self.step + 1e-6)


def step_position(sigmas: Sequence[float], sigma: float) -> StepPosition:
    """Locate ``sigma`` in a descending sigma schedule (as passed to a sampler).

    ``sigmas`` has N + 1 entries for N steps (the last usually 0). An exact match of schedule
    point ``i`` gives step ``i``; a sigma between points ``i`` and ``i + 1`` gives
    ``i + (sigmas[i] − σ) / (sigmas[i] − sigmas[i + 1])``. A sigma above the first point (e.g.
    Euler with churn) is step 0; one below the last evaluated point is the last step.
    """
    n = len(sigmas) - 1
    if n < 1:
        raise ValueError("a sigma schedule needs at least two entries")
    if sigma >= sigmas[0]:
        return StepPosition(0.0, n)
    for i in range(n):
        hi, lo = sigmas[i], sigmas[i + 1]
        if hi >= sigma >= lo:
            if sigma == hi or hi == lo:
                return StepPosition(float(i), n)
            if sigma == lo and i + 1 < n:
                return StepPosition(float(i + 1), n)
            return StepPosition(i + (hi - sigma) / (hi - lo), n)
    return StepPosition(float(n - 1), n)
