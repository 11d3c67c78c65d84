"""S-CFG · Semantic-aware CFG: the CFG weight becomes a per-region map (stage 2, a weight factor).

Paper: Shen et al., "Rethinking the Spatial Inconsistency in Classifier-Free Diffusion Guidance", CVPR 2024
(arXiv 2404.05384). With r(x) the region factor built from the model's attention maps at this step
(``region_guidance.py``, read by the engine's hooks inside the same model call):

    W ← W·r(x),    D̂ = U + W·r(x)·(C − U)    (with APG: C + (W·r(x) − 1)·APG(g))

r comes from g = C − U' after the stage-1 rewrites and is resampled to each band of a band split. Outside
``window`` (or where no map was recorded) the step is plain CFG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..plan import PlanError, WeightFactor
from ..region_guidance import REFERENCES, region_scale_map
from ..schedules import Schedule, ScheduleError, Window

if TYPE_CHECKING:
    from ..step import DirectionInputs


@dataclass(frozen=True)
class SCFG(WeightFactor):
    """S-CFG's settings (the map's resolution, self-attention order, reference region and clamps)."""

    KEY = "scfg"
    ORDER = 20  # after β-CFG's per-sample factor

    downsample: int = 4
    order: int = 4
    reference: str = "foreground (uncond)"
    rate_min: float = 0.8
    rate_max: float = 3.0
    max_weight: float = 15.0
    smoothing: bool = True
    dit_blocks: int = 3
    window: Window = field(default_factory=Window)
    label: str = "S-CFG"

    def validate(self) -> None:
        if self.downsample < 1:
            raise PlanError(f"{self.label}: downsample must be ≥ 1 (official 4); got {self.downsample}")
        if not (0 <= self.order <= 8):
            raise PlanError(f"{self.label}: self_attention_order must be in [0, 8] (official 4); got {self.order}")
        if self.reference not in REFERENCES:
            raise PlanError(f"{self.label}: reference must be one of {', '.join(REFERENCES)}; got {self.reference!r}")
        if not (0 < self.rate_min <= self.rate_max):
            raise PlanError(f"{self.label}: need 0 < rate_min ≤ rate_max (official 0.8 and 3.0); got "
                            f"{self.rate_min} and {self.rate_max}")
        if self.max_weight < 0 or self.dit_blocks < 1:
            raise PlanError(f"{self.label}: max_weight must be ≥ 0 and dit_blocks ≥ 1")
        try:
            self.window.validate(self.label)
        except ScheduleError as e:
            raise PlanError(str(e)) from None

    def active(self, progress: float, sigma: float) -> bool:
        return self.window.contains(progress, sigma)

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        regions = direction.step.regions
        if regions is None:
            return weights
        diff = direction.difference
        frames = diff.shape[2] if diff.ndim == 5 else 0
        if frames:  # video [B, C, T, H, W]: one region map per frame, the readers folded the frames into the batch
            diff = diff.movedim(2, 1).reshape(-1, diff.shape[1], *diff.shape[-2:])
        rate = region_scale_map(diff, regions, max(direction.base_weights), self.rate_min, self.rate_max,
                                self.max_weight, self.smoothing)
        regions.scale = rate  # for the S-CFG Map node (video: one image per frame)
        if frames:
            rate = rate.reshape(-1, frames, *rate.shape[1:]).movedim(1, 2)  # [B, 1, T, H, W]
        return [w * rate for w in weights]

    def windows(self) -> tuple[tuple[str, Schedule], ...]:
        return ((self.label, Schedule(window=self.window)),)
