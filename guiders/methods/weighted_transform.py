"""A direction transform that needs the band's final CFG weight W (ADG, SMC-CFG).

The combine hands a transform the band's direction g and C only (``G = C + (W − 1)·T(g)``). A rule defined on
``U + W·g'`` (ADG's rotation by an angle ∝ W − 1, SMC-CFG's switching term times W) reads W from the same
step's stage-2 weights: as the last weight factor it records them (unchanged) with the step's σ in the run
state, and its ``transform_direction`` reads them back for its band.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..plan import DirectionTransform, WeightFactor
from ..region_guidance import fit_to

if TYPE_CHECKING:
    from ..step import DirectionInputs, GuidanceState

WEIGHT_EPSILON = 1e-6


class WeightedTransform(WeightFactor, DirectionTransform):
    """Mixin for a frozen method dataclass (``KEY``, ``ORDER`` above every weight factor's)."""

    def _slot(self) -> str:
        return f"{self.KEY}/step"

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        direction.state.method_state[self._slot()] = (list(weights), direction.step.sigma)
        return weights

    def step_sigma(self, state: GuidanceState) -> torch.Tensor:
        """The σ of the step whose weights were recorded."""
        return state.method_state[self._slot()][1]

    def band_weight(self, state: GuidanceState, band: int, like: torch.Tensor, per_sample: bool = False
                    ) -> torch.Tensor:
        """W of ``band`` as float32 broadcastable to ``like``; ``per_sample``: reduced to one value per sample."""
        weight = state.method_state[self._slot()][0][band]
        weight = torch.as_tensor(weight, dtype=torch.float32, device=like.device)
        if weight.ndim == 0:
            weight = weight.reshape((1,) * like.ndim)
        elif weight.ndim == like.ndim and weight.ndim == 4 and weight.shape[-2:] != like.shape[-2:] \
                and weight.shape[-1] > 1:
            weight = fit_to(weight, like)
        if per_sample and weight[0].numel() > 1:
            weight = weight.reshape(weight.shape[0], -1).mean(dim=1).reshape((-1,) + (1,) * (like.ndim - 1))
        return weight

    @staticmethod
    def as_increment(guided: torch.Tensor, cond: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """T with ``C + (W − 1)·T = guided``; zero where W = 1 (the step is C there)."""
        step = weight - 1.0
        safe = torch.where(step.abs() > WEIGHT_EPSILON, step, torch.ones_like(step))
        return torch.where(step.abs() > WEIGHT_EPSILON, (guided - cond) / safe, torch.zeros_like(guided))
