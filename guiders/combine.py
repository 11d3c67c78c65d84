"""Evaluate a guidance plan on one model evaluation's predictions (pure torch, no ComfyUI).

All predictions are denoised (x0) predictions, as ComfyUI's CFG path passes them: ``C`` cond,
``U`` uncond, ``B`` an extra branch; ``x`` the noisy input at noise level σ.

Stage 2 in full, for FDG levels l (one level without FDG), base weights ``w_l`` (the sampler's
cfg, or FDG's per-level scales; with FDG's relative mode ``1 + (cfg − 1)·scale_l``):

    f       = CFG schedule multiplier at this step (1 without a schedule; 0 outside its window)
    W_l     = 1 + (w_l − 1)·f                         (the schedule scales the increment)
    W_l    ← W_l·β(τ)·(σ/‖C − U‖)^γ·(N/N_ref)^(γ/2)   (with β-CFG, per sample; the last factor in its default
                                                  per-element RMS mode, 1 in the paper's L2 mode)
    W_l    ← W_l·r(x)                                 (with S-CFG; per pixel, ``region_guidance.py``)
    g_l     = l-th Laplacian band of g = C − U (g itself without FDG)
    without APG:  G_l = U_l + W_l·g_l                 (= ComfyUI's CFG formula when W = cfg)
    with APG:     G_l = C_l + (W_l − 1)·Δ'_l,  Δ'_l = APG(g_l, C_l): momentum, clip, projection without FDG;
                  with FDG the projection Δ⊥ + η·Δ∥ per band only (APG ``fdg_mode`` "full": the whole rule per band,
                  each band with its own momentum buffer)
    D̂       = reconstruct(G_0 … G_{L−1})

Each transform is invariant-preserving: with f = 1, no β-CFG, no APG and equal FDG weights w this
is exactly CFG at w.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .adaptive import (
    UNCOND,
    AdaptiveState,
    apply_row_masks,
    estimate_uncond,
    finish_evaluation,
    is_switched,
    observe,
    record_uncond,
    stage_row_masks,
    wants_estimate,
)
from .frequency import laplacian_pyramid, reconstruct
from .normalization import beta_cfg_factor, rescale_to_cond_std
from .plan import Branch, GuidancePlan
from .progress import StepPosition
from .projection import apg_direction, project_guidance
from .region_guidance import RegionMaps, fit_to, region_scale_map
from .tensor_ops import to_f32
from .uncond_rewrites import optimized_scale, scale_uncond_velocity, tangential_damping


@dataclass
class GuidanceState:
    """Run-scoped state of a plan (momentum buffers). A new sampling run starts with a new one."""

    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    adaptive: AdaptiveState = field(default_factory=AdaptiveState)
    # β-CFG: (progress, the CFG scale its weight amounts to, lowest over the batch) of the last evaluation
    beta_effective: tuple[float, float] | None = None


@dataclass(frozen=True)
class Needs:
    """Which model evaluations one step of a plan needs."""

    cond: bool
    uncond: bool
    branches: tuple[Branch, ...]
    estimate_uncond: bool = False  # LinearAG: the uncond is estimated instead of evaluated
    uncond_branch: Branch | None = None  # the uncond entry is evaluated as this branch (second-model uncond, β = 1)


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


def needs(plan: GuidancePlan, position: StepPosition, sigma: float, state: GuidanceState | None = None) -> Needs:
    """The evaluations this step needs; a branch whose term is off here, or that Adaptive Guidance
    has switched off (``state``), costs nothing."""
    if plan.is_zero_init_step(position):
        return Needs(cond=False, uncond=False, branches=())
    uncond = plan.cfg_multiplier(position, sigma) != 0.0
    branches = tuple(t.branch for t in plan.extra if t.scale_at(position, sigma) != 0.0)
    uncond_branch = None
    if plan.uncond_model is not None and uncond:
        beta = plan.uncond_model.weight_at(position, sigma)
        if beta == 1.0:
            uncond_branch = plan.uncond_model.branch  # the other model's uncond replaces the uncond entry
        elif beta != 0.0:
            branches = branches + (plan.uncond_model.branch,)  # both run; blended in stage 1
    ag = plan.adaptive
    if ag is None:
        return Needs(cond=True, uncond=uncond, branches=branches, uncond_branch=uncond_branch)
    adaptive = state.adaptive if state is not None else AdaptiveState()

    def stopped(name: str) -> bool:
        return ag.starts_switched or is_switched(adaptive, name)

    estimate = False
    if uncond and ag.watches_uncond:
        if stopped(UNCOND):
            uncond = False
        elif ag.linear and wants_estimate(adaptive, ag.calibration_steps, ag.refresh_every):
            uncond, estimate = False, True
    if ag.watches_branches:
        branches = tuple(b for b in branches if not stopped(b.name))
    if not uncond and plan.uncond_model is not None:  # the uncond is stopped or estimated: no other-model uncond
        branches = tuple(b for b in branches if b is not plan.uncond_model.branch)
        uncond_branch = None
    return Needs(cond=True, uncond=uncond, branches=branches, estimate_uncond=estimate, uncond_branch=uncond_branch)


def branch_stopped(plan: GuidancePlan, state: GuidanceState, name: str) -> bool:
    ag = plan.adaptive
    return ag is not None and ag.watches_branches and (ag.starts_switched or is_switched(state.adaptive, name))


def after_evaluation(plan: GuidancePlan, state: GuidanceState, need: Needs, position: StepPosition,
                     x: torch.Tensor, sigma,
                     cond: torch.Tensor, uncond: torch.Tensor | None,
                     branches: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Adaptive Guidance bookkeeping once an evaluation's predictions are in.

    ``uncond`` is the evaluated unconditional prediction (None when it was not run). Updates the
    one-way per-sample switches from the true predictions and LinearAG's regression; returns LinearAG's
    estimated uncond when ``need.estimate_uncond``, else None. The samples that stopped the uncond or a
    branch at an earlier evaluation are staged for this evaluation's ``combine``, which gives them the
    conditional prediction there (``adaptive.apply_row_masks``).
    """
    ag = plan.adaptive
    if ag is None or not need.cond:
        return None
    adaptive = state.adaptive
    kind = ag.parameterization or "ve"
    stage_row_masks(adaptive, x.shape[0])
    estimate = None
    if need.estimate_uncond:
        estimate = estimate_uncond(adaptive, x, sigma, cond)
    watched = ((UNCOND,) if ag.watches_uncond else ()) + (tuple(branches) if ag.watches_branches else ())
    others = dict(branches)
    if uncond is not None:
        others[UNCOND] = uncond
    if position.progress >= ag.start_percent - 1e-6:
        observe(adaptive, ag.threshold, watched, x, sigma, cond, others, kind)
    if ag.linear and (uncond is not None or estimate is not None):
        record_uncond(adaptive, x, sigma, cond, uncond if uncond is not None else estimate,
                      true_evaluation=uncond is not None, fit=True)
    finish_evaluation(adaptive)
    return estimate


def rewrite_uncond(plan: GuidancePlan, inp: StepInputs, uncond: torch.Tensor) -> torch.Tensor:
    """Stage 1: the second-model uncond blend, then TCFG, then CFG-Zero*'s optimised scale."""
    uncond = blend_uncond_model(plan, inp, uncond)
    if plan.tcfg is not None:
        uncond = tangential_damping(inp.x, inp.cond, uncond)
    z = plan.cfg_zero_star
    if z is not None and z.optimized_scale:
        alpha = optimized_scale(inp.x, inp.cond, uncond, inp.sigma)
        uncond = scale_uncond_velocity(inp.x, uncond, alpha)
    return uncond


def blend_uncond_model(plan: GuidancePlan, inp: StepInputs, uncond: torch.Tensor) -> torch.Tensor:
    """``U' = U + β_t·(U_other − U)`` when both were evaluated (0 < β_t ≠ 1). At β_t = 1 the engine
    evaluated the uncond entry on the other model already (``Needs.uncond_branch``)."""
    um = plan.uncond_model
    if um is None or um.branch.name not in inp.branches:
        return uncond
    beta = um.weight_at(inp.position, inp.sigma_value)
    if beta == 0.0 or beta == 1.0:
        return uncond
    other = inp.branches[um.branch.name]
    return (to_f32(uncond) + beta * (to_f32(other) - to_f32(uncond))).to(uncond.dtype)


def guide_cfg_direction(plan: GuidancePlan, inp: StepInputs, uncond: torch.Tensor, multiplier: float,
                        state: GuidanceState) -> torch.Tensor:
    """Stage 2 (see the module docstring). Returns float32."""
    cond = to_f32(inp.cond)
    uncond = to_f32(uncond)
    base = plan.fdg.weights(inp.cond_scale) if plan.fdg is not None else (inp.cond_scale,)
    weights: list[torch.Tensor | float] = [1.0 + (w - 1.0) * multiplier for w in base]
    if plan.beta_cfg is not None:
        bc = plan.beta_cfg
        factor = beta_cfg_factor(cond, uncond, inp.sigma, inp.position.progress, bc.a, bc.b, bc.gamma,
                                 bc.normalize_peak, bc.normalization, bc.reference_elements)
        weights = [w * factor for w in weights]
        state.beta_effective = (inp.position.progress, float(torch.as_tensor(weights[0]).min()))
    diff = cond - uncond
    if plan.scfg is not None and inp.regions is not None:
        # S-CFG: the weight becomes a per-region map W·r(x), r from ‖C − U'‖ per region
        sc = plan.scfg
        rate = region_scale_map(diff, inp.regions, max(base), sc.rate_min, sc.rate_max, sc.max_weight, sc.smoothing)
        inp.regions.scale = rate
        weights = [w * rate for w in weights]
    if plan.fdg is not None:
        levels = len(plan.fdg.scales)
        cond_bands = laplacian_pyramid(cond, levels)
        diff_bands = laplacian_pyramid(diff, levels)
    else:
        cond_bands, diff_bands = [cond], [diff]
    uncond_bands = [uncond] if plan.fdg is None else [c - g for c, g in zip(cond_bands, diff_bands)]
    guided = []
    for level, (c_band, u_band, g_band, w) in enumerate(zip(cond_bands, uncond_bands, diff_bands, weights)):
        if torch.is_tensor(w) and w.ndim == 4 and w.shape[-1] > 1 and w.shape[-2:] != c_band.shape[-2:]:
            w = fit_to(w, c_band)  # S-CFG's map on a smaller FDG band
        if plan.apg is not None and plan.fdg is not None and plan.apg.fdg_mode == "projection":
            # FDG + APG: per-band projection only (diffusers' parallel_weights; no momentum, no clip)
            guided.append(c_band + (w - 1.0) * project_guidance(g_band, c_band, plan.apg.eta))
        elif plan.apg is not None:
            key = f"apg/{level}"
            direction, state.momentum[key] = apg_direction(
                g_band, c_band, plan.apg.eta, plan.apg.norm_threshold, plan.apg.momentum, state.momentum.get(key))
            guided.append(c_band + (w - 1.0) * direction)
        else:
            guided.append(u_band + g_band * w)
    return reconstruct(guided) if plan.fdg is not None else guided[0]


def combine(plan: GuidancePlan, inp: StepInputs, state: GuidanceState) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The guided prediction D̂ and the (rewritten) uncond to hand back to the sampler.

    The returned uncond is None when it was not evaluated (guidance off at this step); it is what
    CFG++ samplers and later hooks should see as the unconditional prediction.
    """
    out_dtype = inp.cond.dtype
    sigma = inp.sigma_value
    if plan.adaptive is not None and state.adaptive.pending_off:
        # Adaptive Guidance: samples that stopped the uncond / a branch earlier get their cond rows there
        uncond, branches = apply_row_masks(state.adaptive, inp.cond, inp.uncond, inp.branches)
        inp = replace(inp, uncond=uncond, branches=branches)
    if plan.is_zero_init_step(inp.position):
        # CFG-Zero* zero-init: a zero velocity/ε, i.e. D̂ = x, leaves the sample where it is
        return inp.x.to(out_dtype), inp.x.to(out_dtype)
    multiplier = plan.cfg_multiplier(inp.position, sigma)
    uncond_out = None
    if inp.uncond is None or multiplier == 0.0:
        guided = to_f32(inp.cond)
    else:
        uncond_out = rewrite_uncond(plan, inp, inp.uncond)
        guided = guide_cfg_direction(plan, inp, uncond_out, multiplier, state)
    for term in plan.extra:
        scale = term.scale_at(inp.position, sigma)
        if scale == 0.0:
            continue
        if term.branch.name not in inp.branches:
            if branch_stopped(plan, state, term.branch.name):
                continue  # Adaptive Guidance switched this branch off: the term is done for this run
            raise KeyError(f"{term.label}: the prediction of branch {term.branch.name!r} is missing")
        guided = guided + scale * (to_f32(inp.cond) - to_f32(inp.branches[term.branch.name]))
    if plan.rescale is not None:
        guided = rescale_to_cond_std(guided, inp.cond, inp.x, inp.sigma, inp.parameterization,
                                     plan.rescale.multiplier)
    return guided.to(out_dtype), (uncond_out.to(out_dtype) if uncond_out is not None else None)
