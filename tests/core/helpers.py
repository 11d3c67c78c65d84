"""Drive a GuidancePlan on exact mixture denoisers, as the engine does inside ComfyUI."""

from __future__ import annotations

import torch

from guidance_kit.guiders.combine import GuidanceState, StepInputs, after_evaluation, combine, needs
from guidance_kit.guiders.plan import GuidancePlan
from guidance_kit.guiders.progress import (
    StepPosition,
    flow_percent_to_sigma,
    log_linear_percent_to_sigma,
    step_position,
)

from .gmm import GaussianMixture, euler_sample


class PlanDenoiser:
    """D̂(x, σ) of a plan on a mixture; counts the evaluations the plan asked for."""

    def __init__(self, plan: GuidancePlan, gmm: GaussianMixture, label: int, cond_scale: float,
                 sigmas: list[float], parameterization: str = "ve", branch_fns: dict | None = None):
        self.plan, self.gmm, self.label, self.cond_scale = plan.for_model(parameterization), gmm, label, cond_scale
        self.sigmas, self.parameterization = sigmas, parameterization
        self.branch_fns = branch_fns or {}
        self.state = GuidanceState()
        self.calls = {"cond": 0, "uncond": 0, "branches": 0}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int | None = None) -> torch.Tensor:
        s = float(sigma.reshape(-1)[0])
        position = step_position(self.sigmas, s, percent_convention(parameterization=self.parameterization))
        need = needs(self.plan, position, s, self.state)
        cond = x
        if need.cond:
            cond = self.gmm.denoise_cond(x, sigma, self.label, self.parameterization)
            self.calls["cond"] += 1
        uncond = None
        if need.uncond:
            uncond = self.gmm.denoise_uncond(x, sigma, self.parameterization)
            self.calls["uncond"] += 1
        branches = {}
        for b in need.branches:
            branches[b.name] = self.branch_fns[b.name](x, sigma)
            self.calls["branches"] += 1
        estimate = after_evaluation(self.plan, self.state, need, position, x, sigma, cond, uncond, branches)
        if estimate is not None:
            uncond = estimate
            self.calls["estimated"] = self.calls.get("estimated", 0) + 1
        inp = StepInputs(x=x, sigma=sigma, cond_scale=self.cond_scale, position=position,
                         parameterization=self.parameterization, cond=cond, uncond=uncond, branches=branches)
        guided, _ = combine(self.plan, inp, self.state)
        return guided


def sample_plan(plan: GuidancePlan, gmm: GaussianMixture, label: int, cond_scale: float, sigmas: list[float],
                n: int = 256, seed: int = 0, parameterization: str = "ve") -> tuple[torch.Tensor, PlanDenoiser]:
    noise = torch.randn((n,) + gmm.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    den = PlanDenoiser(plan, gmm, label, cond_scale, sigmas, parameterization)
    return euler_sample(den, noise, sigmas, parameterization), den


def cfg_reference(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """ComfyUI core's cfg_function formula."""
    return uncond + (cond - uncond) * w


def percent_convention(parameterization: str = "ve"):
    """The percent ↔ σ convention of the test schedules: eps (Karras, σ 0.03–14.6) or flow (shift 3)."""
    if parameterization == "flow":
        return flow_percent_to_sigma(3.0)
    return log_linear_percent_to_sigma(0.03, 14.6)


def position_at(step: float, n_steps: int) -> StepPosition:
    """The position of step ``step`` of an ``n_steps`` run whose progress is linear in the step (p = i/(N−1))."""
    return StepPosition(progress=step / (n_steps - 1) if n_steps > 1 else 0.0, step=float(step), n_steps=n_steps)


def step_inputs(x, cond, uncond, sigma=1.0, cond_scale=5.0, step=3, n_steps=10, parameterization="ve",
                branches=None) -> StepInputs:
    sig = torch.full((x.shape[0],), float(sigma))
    return StepInputs(x=x, sigma=sig, cond_scale=cond_scale, position=position_at(step, n_steps),
                      parameterization=parameterization, cond=cond, uncond=uncond, branches=branches or {})


def random_triplet(shape=(2, 4, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    cond = torch.randn(shape, generator=g)
    uncond = cond + 0.5 * torch.randn(shape, generator=g)
    return x.to(dtype), cond.to(dtype), uncond.to(dtype)
