"""SMC-CFG · sliding-mode control of the guidance error (stage 2, a direction transform that reads the CFG
weight and keeps one buffer over the run).

Paper: Wang, Liu, Chi, Liu, Xue, Duan, "CFG-Ctrl: Control-Based Classifier-Free Diffusion Guidance",
CVPR 2026 (arXiv 2603.03281); official code hanyang-21/CFG-Ctrl, ``pipeline/common_cfg_ctrl.py``
(``CFGCtrlMixin._cfg_ctrl_apply``), on the model outputs p (velocities on its flow models):

    e_t  = p_c − p_u                                   the guidance error
    s_t  = (e_t − e_{t−1}) + λ·e_{t−1}                 the sliding surface (e_{t−1} = e_t at the first step)
    e_t ← e_t − K·sign(s_t),   e_{t−1} := e_t           the switching control; the corrected error is kept
    p̂    = p_u + w·e_t

with p = (x − D)/σ (the velocity on flow models, ε on eps/v models, where the paper did not test it). In x0
terms ``D̂ = U + W·(C − U) + W·σ·K·sign(s_t)``, per value. K is automatic by default (``for_model``): the
official 0.2 on flow models; 0.02 on eps/v models, the pack's choice — Euler moves x by K·W·Δσ per step, and an
eps-model run spans σ_max ≈ 14.6 instead of a flow run's 1, so the official K moves it ≈ 15× further (on the
digits model K 0.2 clips 17% of the pixels where CFG at equal strength clips 1%; K 0.03 matches CFG's).
The buffer lives in the run state: it restarts with every sampler call (a split run differs from one call)
and is per band with a band split. The official ``no_cfg_warmup_steps`` is the pack's CFG Schedule (a window
that starts later).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..plan import PlanError
from ..tensor_ops import per_sample, to_f32
from .weighted_transform import WeightedTransform

if TYPE_CHECKING:
    from ..step import GuidanceState


def sliding_mode_error(error: torch.Tensor, previous: torch.Tensor | None, lam: float, gain: float) -> torch.Tensor:
    """The corrected guidance error ``e − K·sign((e − e_prev) + λ·e_prev)`` (e_prev = e without a buffer)."""
    error = to_f32(error)
    if previous is None:
        previous = error
    elif previous.shape != error.shape:
        raise ValueError(f"SMC-CFG's error buffer has shape {tuple(previous.shape)} but the guidance has "
                         f"{tuple(error.shape)}; the batch changed within a sampling run")
    surface = (error - previous) + lam * previous
    return error - gain * torch.sign(surface)


@dataclass(frozen=True)
class SMCCFG(WeightedTransform):
    """SMC-CFG's settings: λ (the sliding surface's decay rate) and K (the switching gain)."""

    KEY = "smc_cfg"
    ORDER = 50  # after every weight factor (it reads the final W), APG's and ADG's transforms

    FLOW_GAIN = 0.2  # the official recommendation (flow models)
    EPS_GAIN = 0.02  # the pack's automatic K on eps/v models (see the module docstring)

    lam: float = 5.0
    gain: float | None = None  # None: automatic, resolved for the sampled model by ``for_model``
    label: str = "SMC-CFG"

    def validate(self) -> None:
        if self.lam < 0.0 or (self.gain is not None and self.gain < 0.0):
            raise PlanError(f"{self.label}: lambda and K must be ≥ 0 (official recommendation: λ 5, K 0.2); got "
                            f"λ {self.lam}, K {self.gain}")

    def for_model(self, parameterization: str) -> SMCCFG:
        if self.gain is not None:
            return self
        return replace(self, gain=self.FLOW_GAIN if parameterization == "flow" else self.EPS_GAIN)

    @property
    def switching_gain(self) -> float:
        """K (an unresolved automatic K, outside a sampling run, is the official flow value)."""
        return self.FLOW_GAIN if self.gain is None else self.gain

    def transform_direction(self, direction: torch.Tensor, cond: torch.Tensor, band: int, banded: bool,
                            state: GuidanceState) -> torch.Tensor:
        cond, direction = to_f32(cond), to_f32(direction)
        weight = self.band_weight(state, band, cond)
        sigma = per_sample(self.step_sigma(state), cond)
        key = f"{self.KEY}/{band}"
        error = -direction / sigma  # p_c − p_u = ((x − C) − (x − U))/σ
        corrected = sliding_mode_error(error, state.momentum.get(key), self.lam, self.switching_gain)
        state.momentum[key] = corrected
        guided = (cond - direction) - weight * sigma * corrected  # x − σ·(p_u + W·e) = U − σ·W·e
        return self.as_increment(guided, cond, weight)
