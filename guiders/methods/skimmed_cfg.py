"""Skimmed CFG · CFG at a lower scale wherever the guided prediction overshoots both predictions (stage 1, an
uncond rewrite, and stage 2, a per-value weight factor).

Reference: Extraltodeus/Skimmed_CFG, ``skimmed_CFG.py`` (its "Skimmed CFG" node, a pre-CFG patch; no paper).
For predictions A, B at cfg s the skimming mask marks the values where CFG pushes past both, away from zero:

    D_AB = B + s·(A − B)
    mask = sign(A − B) = sign(A)  ∧  sign(A) = sign(D_AB)  ∧  sign(D_AB) = sign(D_AB − x)   (the last: the
                                                                              "flipping filter", optional)

and there A is moved so that CFG gives the skimming scale k instead of s: ``A ← A − (s − k)/s·(A − B)``.
The reference runs it twice, first on the uncond (A = U, B = C; k = 0 with ``full_skim_negative``), then on
the cond against that uncond (A = C, B = U'). In the plan:

    stage 1:  U' = U + (s − k_neg)/s·(C − U)   where mask(U, C)          (s: the sampler's cfg)
    stage 2:  W ← k                             where mask(C, U') at the weight W

which gives the reference's ``U' + s·(C' − U')`` exactly (tested) while the conditional prediction the sampler
and post-CFG nodes see stays the model's. It only damps: where W ≤ k (and s ≤ k for the uncond pass) it does
nothing (the reference would raise those values to scale k; the pack's choice). With a band split (FDG) the
per-value weight is not applied per band: only the uncond pass acts (a note says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, Note, PlanError, UncondRewrite, WeightFactor
from ..tensor_ops import to_f32

if TYPE_CHECKING:
    from ..step import DirectionInputs, GuidanceState, StepInputs


def skimming_mask(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale, flipping_filter: bool = True
                  ) -> torch.Tensor:
    """Where CFG of ``a`` over ``b`` at ``scale`` overshoots both, away from zero (and, with the flipping
    filter, where the step moves the value further from zero than x)."""
    guided = b + scale * (a - b)
    mask = ((a - b).sign() == a.sign()) & (a.sign() == guided.sign())
    if flipping_filter:
        mask = mask & (guided.sign() == (guided - x).sign())
    return mask


def skim_uncond(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scale: float, skimming_scale: float,
                flipping_filter: bool = True) -> torch.Tensor:
    """The uncond pass: U' = U + (s − k)/s·(C − U) where CFG of U over C overshoots. Float32."""
    x, cond, uncond = to_f32(x), to_f32(cond), to_f32(uncond)
    if scale <= skimming_scale or scale == 0.0:
        return uncond
    mask = skimming_mask(x, uncond, cond, scale, flipping_filter)
    return torch.where(mask, uncond + (scale - skimming_scale) / scale * (cond - uncond), uncond)


def skimmed_weight(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, weight, skimming_scale: float,
                   flipping_filter: bool = True) -> torch.Tensor:
    """The cond pass as a per-value CFG weight: k where CFG of C over U' at W overshoots (and W > k), else W."""
    weight = torch.as_tensor(weight, dtype=torch.float32, device=cond.device)
    mask = skimming_mask(to_f32(x), to_f32(cond), to_f32(uncond), weight, flipping_filter) & (weight > skimming_scale)
    return torch.where(mask, torch.full_like(mask, skimming_scale, dtype=torch.float32), weight)


@dataclass(frozen=True)
class SkimmedCFG(UncondRewrite, WeightFactor):
    """Skimmed CFG's settings: the skimming scale k, the uncond pass's (0 with ``full_skim_negative``), the
    flipping filter."""

    KEY = "skimmed_cfg"
    ORDER = 30  # the last uncond rewrite (it skims the uncond the others left) and the last per-value weight
    AT_CFG_ONE = CfgOne.INACTIVE

    skimming_scale: float = 7.0
    full_skim_negative: bool = False
    flipping_filter: bool = True
    label: str = "Skimmed CFG"

    def validate(self) -> None:
        if self.skimming_scale < 0.0:
            raise PlanError(f"{self.label}: skimming_cfg must be ≥ 0 (the reference's default is 7); "
                            f"got {self.skimming_scale}")

    @property
    def negative_scale(self) -> float:
        return 0.0 if self.full_skim_negative else self.skimming_scale

    def rewrite_uncond(self, inp: StepInputs, uncond: torch.Tensor) -> torch.Tensor:
        skimmed = skim_uncond(inp.x, inp.cond, uncond, inp.cond_scale, self.negative_scale, self.flipping_filter)
        return skimmed.to(uncond.dtype)

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        if len(weights) > 1:
            direction.state.method_state[self.KEY] = "banded"
            return weights
        x = direction.step.x
        return [skimmed_weight(x, direction.cond, direction.uncond, weights[0], self.skimming_scale,
                               self.flipping_filter)]

    def cfg_notes(self, cond_scale: float) -> list[Note]:
        if cond_scale <= 1.0 or cond_scale > self.skimming_scale or self.full_skim_negative:
            return []
        return [("skimmed-low-cfg", (
            f"{self.label}: cfg {cond_scale:g} is not above skimming_cfg {self.skimming_scale:g}, so there is nothing "
            f"to skim and the node has no effect. Use it at a high cfg (e.g. 10–20) with skimming_cfg at the scale "
            f"whose look you want (e.g. 3–7)."))]

    def step_notes(self, state: GuidanceState, cond_scale: float) -> list[Note]:
        if state.method_state.get(self.KEY) != "banded":
            return []
        return [("skimmed-banded", f"{self.label}: with a frequency-band split (FDG) only its uncond pass acts; "
                                   f"the per-value weight of its cond pass is not applied per band.")]
