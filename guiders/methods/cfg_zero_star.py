"""CFG-Zero* · optimised uncond scale α* (stage 1, an uncond rewrite) and zero-init (stage 4, the first
steps of a call from pure noise leave the sample where it is, without a model call).

Paper: Fan, Zheng, Yeh, Liu, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models",
arXiv 2503.18886; the official code computes α* on the velocity prediction, per sample. With
``v = (x − D)/σ`` (ε on eps models, the velocity on flow models):

    α*  = ⟨v_c, v_u⟩ / (‖v_u‖² + 1e−8)
    v̂   = α*·v_u + w·(v_c − α*·v_u)          i.e. CFG on (C, U') with x − U' = α*·(x − U)
    D̂   = w·C + α*(1 − w)·U + (1 − α*)(1 − w)·x        (in x0 space; ComfyUI core's CFGZeroStar drops
                                                      the last term, which is why it differs)
    zero-init: D̂ = x on the first ``zero_init_steps`` steps (a zero velocity/ε)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, GuidancePlan, Note, PlanError, StepOverride, UncondRewrite
from ..progress import StepPosition
from ..tensor_ops import batch_dot, per_sample, to_f32

if TYPE_CHECKING:
    from ..step import StepInputs


def optimized_scale(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                    sigma: torch.Tensor | float) -> torch.Tensor:
    """α* = ⟨v_c, v_u⟩ / (‖v_u‖² + 1e−8) per sample, with v = (x − D)/σ (float32, [B,1,...])."""
    s = per_sample(sigma, x)
    v_c = (to_f32(x) - to_f32(cond)) / s
    v_u = (to_f32(x) - to_f32(uncond)) / s
    return batch_dot(v_c, v_u) / (batch_dot(v_u, v_u) + 1e-8)


def scale_uncond_velocity(x: torch.Tensor, uncond: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """U' with ``x − U' = α·(x − U)``, i.e. the uncond velocity/ε scaled by α."""
    return (alpha * to_f32(uncond) + (1.0 - alpha) * to_f32(x)).to(uncond.dtype)


@dataclass(frozen=True)
class CFGZeroStar(UncondRewrite, StepOverride):
    """CFG-Zero*: optimised uncond scale α* and/or zero-init of the first ``zero_init_steps`` steps.

    ``zero_init_steps`` counts zeroed steps of a sampler call that starts from pure noise: 0 = off, 1 = the
    first step (the official code's ``zero_steps=0``), 2 = the first two (official ``zero_steps=1``, its Wan
    T2V setting). ``None`` = automatic: ``AUTO_FLOW_STEPS`` on flow models, off on eps/v models, where
    the official code never runs and a zeroed first step leaves its noise in the image (``for_model``).
    """

    KEY = "cfg_zero_star"
    ORDER = 20  # after TCFG: α* is computed on the uncond TCFG left
    AUTO_FLOW_STEPS = 1

    optimized_scale: bool = True
    zero_init_steps: int | None = None
    label: str = "CFG-Zero*"

    def validate(self) -> None:
        if self.zero_init_steps is not None and self.zero_init_steps < 0:
            raise PlanError(f"{self.label}: zero_init_steps must be ≥ 0, or automatic (got {self.zero_init_steps})")
        if not self.optimized_scale and self.zero_init_steps == 0:
            raise PlanError(f"{self.label}: both the optimised scale and zero-init are off, so the node would do "
                            f"nothing; enable one of them or remove the node")

    def rewrite_uncond(self, inp: StepInputs, uncond: torch.Tensor) -> torch.Tensor:
        if not self.optimized_scale:
            return uncond
        alpha = optimized_scale(inp.x, inp.cond, uncond, inp.sigma)
        return scale_uncond_velocity(inp.x, uncond, alpha)

    def skips_step(self, position: StepPosition) -> bool:
        """The first steps of a sampler call that starts from pure noise (never a second pass, a refiner or
        img2img). An unresolved automatic setting (see ``for_model``) zero-inits nothing."""
        return (position.from_noise and self.zero_init_steps is not None
                and position.step_index < self.zero_init_steps)

    def for_model(self, parameterization: str) -> CFGZeroStar:
        if self.zero_init_steps is not None:
            return self
        return replace(self, zero_init_steps=self.AUTO_FLOW_STEPS if parameterization == "flow" else 0)

    def cfg_one(self, plan: GuidancePlan) -> CfgOne:
        return CfgOne.REWRITES_UNCOND if self.optimized_scale else CfgOne.ACTS

    def cfg_one_label(self) -> str:
        return self.label + (" (optimised scale; zero-init still acts)" if self.zero_init_steps else "")

    def model_notes(self, parameterization: str) -> list[Note]:
        if not self.zero_init_steps or parameterization == "flow":
            return []
        return [("zero-init-eps", f"{self.label}: zero-init is on for a model that is not a flow model (SD1.5, SDXL "
                                  f"and other eps/v models): its first {self.zero_init_steps} step(s) keep their "
                                  f"noise, which shows as dark or noisy blobs. The paper's code zero-inits flow "
                                  f"models only; set zero_init_steps to -1 (automatic) or 0.")]
