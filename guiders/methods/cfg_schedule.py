"""CFG Schedule · CFG weight schedulers and the guidance interval (stage 2, the schedule of the CFG
weight's increment).

Papers: Wang et al., "Analysis of Classifier-Free Guidance Weight Schedulers", TMLR 2024
(arXiv 2404.13040); Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality", NeurIPS 2024 (arXiv 2404.07724). With f(p) the schedule's multiplier at the run's
progress p (mean 1 over the run, 0 outside its window; ``schedules.py``):

    W = 1 + (w − 1)·f(p)

so f = 0 is the conditional prediction alone (never an unconditional step) and the uncond call is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..plan import IncrementMultiplier
from ..progress import StepPosition
from ..schedules import Schedule


@dataclass(frozen=True)
class CFGSchedule(IncrementMultiplier):
    KEY = "cfg_schedule"

    schedule: Schedule = field(default_factory=Schedule)
    label: str = "CFG Schedule"

    def validate(self) -> None:
        self.schedule.validate(self.label)

    def cfg_multiplier(self, position: StepPosition, sigma: float) -> float:
        return self.schedule.multiplier(position.progress, sigma)

    def windows(self) -> tuple[tuple[str, Schedule], ...]:
        return ((self.label, self.schedule),)
