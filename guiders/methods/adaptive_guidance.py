"""Adaptive Guidance · AG and LinearAG: fewer model evaluations per run (stage 0, evaluation control).

Paper: Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
arXiv 2312.12487 (AAAI 2025). Per sample, an evaluation (the uncond, or an extra branch B) stops for the
rest of the run once

    cos(ε_c, ε_other) ≥ γ̄     (ε = (x − α·D)/σ, the noise prediction; after ``start_percent``)

and that sample gets the conditional prediction there from then on; LinearAG estimates the skipped
unconds as ``ε̂_u,t = a·ε_c,t + b·ε_u,t−1 + c·ε_c,t−1`` (fitted online, per sample). The rules, the state
and the regression are in ``guiders/adaptive.py``; this module is the plan's side: which evaluations a
step needs, the row masks before the combine, and the bookkeeping after each evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..adaptive import (
    UNCOND,
    apply_row_masks,
    estimate_uncond,
    finish_evaluation,
    is_switched,
    observe,
    record_uncond,
    stage_row_masks,
    wants_estimate,
)
from ..plan import Branch, CfgOne, EvaluationControl, GuidancePlan, PlanError
from ..progress import StepPosition

if TYPE_CHECKING:
    from ..step import GuidanceState, Needs, StepInputs

ADAPTIVE_SCOPES = ("uncond and branches", "uncond only", "branches only")


@dataclass(frozen=True)
class AdaptiveGuidance(EvaluationControl):
    """Adaptive Guidance / LinearAG settings: which evaluations stop, and when.

    ``threshold`` γ̄: an evaluation stops for the rest of the run (per sample) once cos(ε_c, ε_other) ≥ γ̄
    at a progress ≥ ``start_percent`` (γ̄ > 1 never stops; γ̄ = −1 stops from the first step, whatever
    ``start_percent``). The guard exists because at high noise ε_c and ε_u are both ≈ the input noise, so
    their cosine is ≈ 1 before guidance has done its work (measured on the exact mixture: 0.9999 at
    σ = 14.6; on flow models ε = x exactly at σ = 1), and the switch is one-way. ``linear`` adds
    LinearAG's estimated uncond on ``refresh_every − 1`` of every ``refresh_every`` evaluations
    after ``calibration_steps`` evaluated ones.

    Defaults (the node's): LinearAG alone, the switch off (``NO_SWITCH``): on the embedded digits model
    (a real ε network, cfg 7) the switch from 50–80% of the run lost quality against CFG (Fréchet distance
    +26…33%, diversity −9…−18%), from 90% it cost +5% and saved no more than LinearAG alone, which kept CFG's
    quality at −22% passes (``benchmarks/adaptive_cost.py --digits``).
    """

    KEY = "adaptive"
    NO_SWITCH = 1.01

    threshold: float = NO_SWITCH
    scope: str = "uncond and branches"
    start_percent: float = 0.5
    linear: bool = True
    calibration_steps: int = 3
    refresh_every: int = 2
    label: str = "Adaptive Guidance"
    parameterization: str | None = None  # "ve" / "flow": how ε is read from D (resolved by ``for_model``)

    def validate(self) -> None:
        if not (-1.0 <= self.threshold <= 1.5):
            raise PlanError(f"{self.label}: threshold is a cosine similarity in [−1, 1] (above 1 never switches); "
                            f"got {self.threshold}. The paper's range is about 0.98–0.999")
        if not (0.0 <= self.start_percent <= 1.0):
            raise PlanError(f"{self.label}: start_percent is a fraction of the run in [0, 1]; got {self.start_percent}")
        if self.scope not in ADAPTIVE_SCOPES:
            raise PlanError(f"{self.label}: scope must be one of {', '.join(ADAPTIVE_SCOPES)}; got {self.scope!r}")
        if self.linear:
            if not self.watches_uncond:
                raise PlanError(f"{self.label}: LinearAG estimates the unconditional prediction, so the scope must "
                                f"include the uncond (got {self.scope!r}); turn linear_ag off to stop only the "
                                f"extra branches")
            if self.calibration_steps < 2:
                raise PlanError(f"{self.label}: LinearAG needs at least 2 calibration steps (it regresses on the "
                                f"previous step); got {self.calibration_steps}")
            if self.refresh_every < 1:
                raise PlanError(f"{self.label}: refresh_every must be ≥ 1 (1 = never estimate); "
                                f"got {self.refresh_every}")

    @property
    def watches_uncond(self) -> bool:
        return self.scope != "branches only"

    @property
    def watches_branches(self) -> bool:
        return self.scope != "uncond only"

    @property
    def starts_switched(self) -> bool:
        return self.threshold <= -1.0

    # --- declarations ---------------------------------------------------------------------------
    def for_model(self, parameterization: str) -> AdaptiveGuidance:
        if self.parameterization == parameterization:
            return self
        return replace(self, parameterization=parameterization)  # ε is read from D per model

    def cfg_one(self, plan: GuidancePlan) -> CfgOne:
        return CfgOne.ACTS if plan.extra and self.watches_branches else CfgOne.INACTIVE

    def run_report(self, state: GuidanceState) -> str:
        adaptive = state.adaptive
        stops = ", ".join(f"{name} off after evaluation {index + 1}" for name, index in adaptive.switched.items())
        stops += "".join(f"{', ' if stops else ''}{name} off for {int(rows.sum())} of {rows.numel()} samples (its pass "
                         f"runs until all are)" for name, rows in adaptive.rows_off.items()
                         if name not in adaptive.switched and bool(rows.any()))
        if self.starts_switched:
            stops = "off from the start (threshold −1)"
        text = f". {self.label}: {stops or 'nothing switched off'}"
        if self.linear:
            text += f"; LinearAG estimated the uncond {adaptive.estimated}×"
        if adaptive.last_cosine:
            text += "; last cosines " + ", ".join(f"{k} {v:.4f}" for k, v in adaptive.last_cosine.items())
        return text

    # --- evaluation control ---------------------------------------------------------------------
    def _stopped(self, state: GuidanceState, name: str) -> bool:
        return self.starts_switched or is_switched(state.adaptive, name)

    def limit_evaluations(self, uncond: bool, branches: tuple[Branch, ...],
                          state: GuidanceState) -> tuple[bool, bool, tuple[Branch, ...]]:
        estimate = False
        if uncond and self.watches_uncond:
            if self._stopped(state, UNCOND):
                uncond = False
            elif self.linear and wants_estimate(state.adaptive, self.calibration_steps, self.refresh_every):
                uncond, estimate = False, True
        if self.watches_branches:
            branches = tuple(b for b in branches if not self._stopped(state, b.name))
        return uncond, estimate, branches

    def stops_branch(self, state: GuidanceState, name: str) -> bool:
        return self.watches_branches and self._stopped(state, name)

    def prepare_inputs(self, inp: StepInputs, state: GuidanceState) -> StepInputs:
        """Samples that stopped the uncond / a branch earlier get their cond rows there."""
        if not state.adaptive.pending_off:
            return inp
        uncond, branches = apply_row_masks(state.adaptive, inp.cond, inp.uncond, inp.branches)
        return replace(inp, uncond=uncond, branches=branches)

    def after_evaluation(self, state: GuidanceState, need: Needs, position: StepPosition, x: torch.Tensor, sigma,
                         cond: torch.Tensor, uncond: torch.Tensor | None,
                         branches: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Updates the one-way per-sample switches from the true predictions and LinearAG's regression; returns
        LinearAG's estimated uncond when ``need.estimate_uncond``. The samples that stopped the uncond or a branch
        at an earlier evaluation are staged for this evaluation's combine (``prepare_inputs``)."""
        if not need.cond:
            return None
        adaptive = state.adaptive
        stage_row_masks(adaptive, x.shape[0])
        estimate = None
        if need.estimate_uncond:
            estimate = estimate_uncond(adaptive, x, sigma, cond)
        watched = ((UNCOND,) if self.watches_uncond else ()) + (tuple(branches) if self.watches_branches else ())
        others = dict(branches)
        if uncond is not None:
            others[UNCOND] = uncond
        if position.progress >= self.start_percent - 1e-6:
            observe(adaptive, self.threshold, watched, x, sigma, cond, others, self.parameterization or "ve")
        if self.linear and (uncond is not None or estimate is not None):
            record_uncond(adaptive, x, sigma, cond, uncond if uncond is not None else estimate,
                          true_evaluation=uncond is not None, fit=True)
        finish_evaluation(adaptive)
        return estimate
