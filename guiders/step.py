"""What one model evaluation hands the plan, and what the plan keeps over a run (pure torch).

All predictions are denoised (x0) predictions, as ComfyUI's CFG path passes them: ``cond`` C, ``uncond``
U, ``branches`` each extra branch's prediction B; ``x`` the noisy input at noise level σ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adaptive import AdaptiveState
from .plan import Branch
from .progress import StepPosition
from .region_guidance import RegionMaps


@dataclass
class GuidanceState:
    """Run-scoped state of a plan; a new sampling run starts with a new one.

    ``momentum``: running buffers of the CFG direction, keyed "<method key>/<band>" (APG's momentum);
    ``adaptive``: Adaptive Guidance's switches and LinearAG's fit; ``method_state``: anything else a method
    keeps over the run, under its KEY (e.g. the CFG scale β-CFG amounted to at the last evaluation).
    """

    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    adaptive: AdaptiveState = field(default_factory=AdaptiveState)
    method_state: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Needs:
    """Which model evaluations one step of a plan needs."""

    cond: bool
    uncond: bool
    branches: tuple[Branch, ...]
    estimate_uncond: bool = False  # LinearAG: the uncond is estimated instead of evaluated
    uncond_branch: Branch | None = None  # the uncond entry is evaluated as this branch (ICG, second-model uncond)


@dataclass
class StepInputs:
    x: torch.Tensor
    sigma: torch.Tensor  # [B] (or scalar)
    cond_scale: float
    position: StepPosition
    parameterization: str  # "ve" | "flow"
    cond: torch.Tensor
    uncond: torch.Tensor | None  # None when not evaluated (cfg 1, or outside the CFG window)
    branches: dict[str, torch.Tensor] = field(default_factory=dict)
    regions: RegionMaps | None = None  # S-CFG: this step's attention regions (None = not recorded)

    @property
    def sigma_value(self) -> float:
        return float(torch.as_tensor(self.sigma).reshape(-1)[0])


@dataclass
class DirectionInputs:
    """What the stage-2 weight factors see (float32): C, the rewritten U', g = C − U' and the base weights
    (the sampler's cfg, or a band split's weights, before the schedule)."""

    step: StepInputs
    cond: torch.Tensor
    uncond: torch.Tensor
    difference: torch.Tensor
    base_weights: tuple[float, ...]
    state: GuidanceState
