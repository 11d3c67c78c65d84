"""Evaluate a guidance plan on one model evaluation's predictions (pure torch, no ComfyUI).

The plan is a registry of methods (``plan.py``); this module runs their roles stage by stage and never
names a method. Predictions are denoised (x0): ``C`` cond, ``U`` uncond, ``B`` an extra branch, ``x`` the
noisy input at noise level σ.

Stage 2 in full, for bands l of a band split (one band without one), base weights ``w_l`` (the sampler's
cfg, or the split's per-band weights):

    f       = Π increment multipliers at this step (the CFG schedule; 1 without one, 0 outside its window)
    W_l     = 1 + (w_l − 1)·f                           (the schedule scales the increment)
    W_l    ← W_l·m_1·m_2…                               (weight factors in ORDER: β-CFG's per-sample factor,
                                                         S-CFG's per-pixel map)
    g_l     = l-th band of g = C − U' (g itself without a split)
    without a direction transform:  G_l = U_l + W_l·g_l     (= ComfyUI's CFG formula when W = cfg)
    with transforms T (in ORDER):   G_l = C_l + (W_l − 1)·T(g_l)   (APG: momentum, clip, projection)
    D̂       = merge(G_0 … G_{L−1})

Then the extra terms (stage 3) are added and the corrections (stage 4) applied. Each step of this is
invariant-preserving: with f = 1, no factor, no transform and one band this is exactly CFG at w.
"""

from __future__ import annotations

import torch

from .plan import (
    Correction,
    DirectionTransform,
    EvaluationControl,
    ExtraTerm,
    GuidancePlan,
    UncondRewrite,
    UncondSource,
    WeightFactor,
)
from .progress import StepPosition
from .region_guidance import fit_to
from .step import DirectionInputs, GuidanceState, Needs, StepInputs
from .tensor_ops import to_f32


def needs(plan: GuidancePlan, position: StepPosition, sigma: float, state: GuidanceState | None = None) -> Needs:
    """The evaluations this step needs; a branch whose term is off here, or that an evaluation control
    (Adaptive Guidance) has switched off (``state``), costs nothing."""
    if plan.skips_step(position):
        return Needs(cond=False, uncond=False, branches=())
    state = state if state is not None else GuidanceState()
    uncond = plan.cfg_multiplier(position, sigma) != 0.0
    branches = tuple(b for term in plan.methods_of(ExtraTerm) for b in term.branches_at(position, sigma))
    estimate = False
    for control in plan.methods_of(EvaluationControl):
        uncond, estimated, branches = control.limit_evaluations(uncond, branches, state)
        estimate = estimate or estimated
    substitute = None
    for source in plan.methods_of(UncondSource):  # one at most (an exclusive group)
        substitute, feeds = source.uncond_source(position, sigma, uncond)
        branches = branches + feeds
    return Needs(cond=True, uncond=uncond, branches=branches, estimate_uncond=estimate, uncond_branch=substitute)


def after_evaluation(plan: GuidancePlan, state: GuidanceState, need: Needs, position: StepPosition,
                     x: torch.Tensor, sigma,
                     cond: torch.Tensor, uncond: torch.Tensor | None,
                     branches: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The evaluation controls' bookkeeping once an evaluation's predictions are in (``uncond``: the evaluated
    unconditional prediction, None when it was not run; ``branches``: the guidance terms' predictions).
    Returns an estimated uncond (LinearAG) when ``need.estimate_uncond``, else None."""
    estimate = None
    for control in plan.methods_of(EvaluationControl):
        found = control.after_evaluation(state, need, position, x, sigma, cond, uncond, branches)
        estimate = found if found is not None else estimate
    return estimate


def rewrite_uncond(plan: GuidancePlan, inp: StepInputs, uncond: torch.Tensor) -> torch.Tensor:
    """Stage 1: the uncond rewrites in ORDER (second-model blend, TCFG, CFG-Zero*'s optimised scale)."""
    for method in plan.methods_of(UncondRewrite):
        uncond = method.rewrite_uncond(inp, uncond)
    return uncond


def guide_cfg_direction(plan: GuidancePlan, inp: StepInputs, uncond: torch.Tensor, multiplier: float,
                        state: GuidanceState) -> torch.Tensor:
    """Stage 2 (see the module docstring). Returns float32."""
    cond = to_f32(inp.cond)
    uncond = to_f32(uncond)
    split = plan.band_split
    base = split.band_weights(inp.cond_scale) if split is not None else (inp.cond_scale,)
    weights: list = [1.0 + (w - 1.0) * multiplier for w in base]
    direction = DirectionInputs(step=inp, cond=cond, uncond=uncond, difference=cond - uncond, base_weights=base,
                                state=state)
    for factor in plan.methods_of(WeightFactor):
        weights = factor.scale_weights(weights, direction)
    diff = direction.difference
    if split is not None:
        cond_bands, diff_bands = split.split(cond), split.split(diff)
        uncond_bands = [c - g for c, g in zip(cond_bands, diff_bands)]
    else:
        cond_bands, diff_bands, uncond_bands = [cond], [diff], [uncond]
    transforms = plan.methods_of(DirectionTransform)
    guided = []
    for band, (c_band, u_band, g_band, w) in enumerate(zip(cond_bands, uncond_bands, diff_bands, weights)):
        if torch.is_tensor(w) and w.ndim == 4 and w.shape[-1] > 1 and w.shape[-2:] != c_band.shape[-2:]:
            w = fit_to(w, c_band)  # a per-pixel weight (S-CFG's map) on a smaller band
        if not transforms:
            guided.append(u_band + g_band * w)
            continue
        for transform in transforms:
            g_band = transform.transform_direction(g_band, c_band, band, split is not None, state)
        guided.append(c_band + (w - 1.0) * g_band)
    return split.merge(guided) if split is not None else guided[0]


def combine(plan: GuidancePlan, inp: StepInputs, state: GuidanceState) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The guided prediction D̂ and the (rewritten) uncond to hand back to the sampler.

    The returned uncond is None when it was not evaluated (guidance off at this step); it is what
    CFG++ samplers and later hooks should see as the unconditional prediction.
    """
    out_dtype = inp.cond.dtype
    for control in plan.methods_of(EvaluationControl):
        inp = control.prepare_inputs(inp, state)
    if plan.skips_step(inp.position):
        return inp.x.to(out_dtype), inp.x.to(out_dtype)  # D̂ = x leaves the sample where it is
    multiplier = plan.cfg_multiplier(inp.position, inp.sigma_value)
    uncond_out = None
    if inp.uncond is None or multiplier == 0.0:
        guided = to_f32(inp.cond)
    else:
        uncond_out = rewrite_uncond(plan, inp, inp.uncond)
        guided = guide_cfg_direction(plan, inp, uncond_out, multiplier, state)
    for term in plan.methods_of(ExtraTerm):
        guided = term.add_to(guided, inp, state, plan)
    for correction in plan.methods_of(Correction):
        guided = correction.correct(guided, inp)
    return guided.to(out_dtype), (uncond_out.to(out_dtype) if uncond_out is not None else None)
