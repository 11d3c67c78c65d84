"""The guidance engine: evaluates a model's GuidancePlan inside ComfyUI's CFG path.

Installed once per model (idempotent) by every method node:

* ``sampler_calc_cond_batch_function`` (single slot; a previous occupant is kept and called):
  decides per step which evaluations the plan needs (a branch outside its window, the uncond
  outside the CFG window, everything on a CFG-Zero* zero-init step costs nothing) and runs cond,
  uncond **and every extra branch in one** ``calc_cond_batch`` **call**. Branch chunks are marked
  in ``transformer_options[BRANCH_MAP_KEY]`` (batch index → Branch) so perturbation hooks act on
  their chunk only (``hooks.py``).
* ``sampler_pre_cfg_function`` (list): combines the predictions (``guiders.combine``), hands the
  (rewritten) uncond back so core CFG, later pre-cfg patches and CFG++ samplers see it, and keeps
  the difference between the plan's result and core CFG for the post-cfg hook.
* ``sampler_post_cfg_function`` (list): adds that difference to whatever ComfyUI's CFG (or a
  ``sampler_cfg_function`` such as RescaleCFG) produced. With nothing else installed the output is
  exactly the plan's D̂; other post-cfg nodes compose additively, in chain order.
* an ``OUTER_SAMPLE`` wrapper that gives every sampling run a fresh ``RunState`` (momentum etc.).

If another pack replaces our calc-cond-batch slot, or a guider bypasses the pre-cfg list
(ComfyUI's DualCFGGuider), the plan is still applied (extra branches then run as separate
forwards) and a warning says why it costs more. It never silently does nothing.
"""

from __future__ import annotations

import logging
import math
import uuid
import weakref
from dataclasses import dataclass, field

import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import torch

from ..guiders.combine import GuidanceState, Needs, StepInputs, after_evaluation, combine, needs
from ..guiders.plan import Branch, GuidancePlan
from ..guiders.progress import FROM_NOISE_PERCENT, StepPosition, percent_of_sigma, step_in_call
from ..guiders.region_guidance import RegionRecorder
from ..guiders.schedules import Window
from . import second_model

log = logging.getLogger("guidance_kit")

PLAN_KEY = "guidance_kit_plan"
RUN_KEY = "guidance_kit_run"
EXTRA_CONDS_KEY = "guidance_kit_conds"
BRANCH_MAP_KEY = "guidance_kit_branches"
REGION_RECORDER_KEY = "guidance_kit_scfg"  # transformer_options: the S-CFG RegionRecorder of this evaluation
REGION_STORE_KEY = "guidance_kit_scfg_maps"  # model_options: the RegionMapStore of an S-CFG node
WRAPPER_KEY = "guidance_kit"
PACK = "Guidance Kit"


class GuidanceRuntimeError(RuntimeError):
    """Raised during sampling with a message that names the method and the fix."""


@dataclass
class StepStash:
    x: torch.Tensor
    position: StepPosition
    parameterization: str
    branches: dict[str, torch.Tensor]
    uncond_evaluated: bool
    uncond_skipped_by_plan: bool
    uncond_override: torch.Tensor | None = None  # ICG evaluated outside our slot
    regions: object | None = None  # S-CFG: RegionMaps recorded in this evaluation


@dataclass
class RunState:
    """Everything that lives for one sampling run and no longer."""

    guidance: GuidanceState = field(default_factory=GuidanceState)
    sigmas: list[float] | None = None
    sigmas_ref: object = None
    stash: StepStash | None = None
    delta: tuple[torch.Tensor, torch.Tensor] | None = None
    windows_checked: bool = False
    plan_source: GuidancePlan | None = None  # the model's plan, and ``plan``: it resolved for the sampled model
    plan: GuidancePlan | None = None
    parameterization: str = ""
    cfg_checked: bool = False
    warned: set = field(default_factory=set)
    calc_calls: int = 0
    evaluations: int = 0
    passes: int = 0  # model passes (batch chunks: cond, uncond, each branch) actually run
    plain_passes: int = 0  # what plain CFG would have run for the same evaluations
    second_models: dict = field(default_factory=dict)  # second ModelPatchers used in this run ("second models")

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message)


# ------------------------------------------------------------------------------------------------
# plan access and installation
# ------------------------------------------------------------------------------------------------

def get_plan(model_options: dict) -> GuidancePlan | None:
    plan = model_options.get(PLAN_KEY)
    return plan if isinstance(plan, GuidancePlan) else None


def run_state(model_options: dict) -> RunState:
    state = model_options.get(RUN_KEY)
    if state is None:
        # Not started through CFGGuider.sample (no OUTER_SAMPLE wrapper): this dict is the
        # sampler's per-run model_options, so state kept here still lives for one run only.
        state = RunState()
        model_options[RUN_KEY] = state
    return state


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    run = RunState()
    guider.model_options[RUN_KEY] = run
    try:
        check_second_models(getattr(guider, "model_patcher", None))
        return executor(*args, **kwargs)
    finally:
        release_second_models(run.second_models)
        guider.model_options.pop(RUN_KEY, None)
        report = call_report(run, get_plan(guider.model_options))
        if report:
            log.info(report)


def call_report(run: RunState, plan: GuidancePlan | None) -> str:
    """The NFE counter line logged after each run: model passes made vs plain CFG of the same length."""
    if run.evaluations == 0 or run.plain_passes == 0:
        return ""
    change = 100.0 * (run.passes - run.plain_passes) / run.plain_passes
    line = (f"{PACK}: {run.evaluations} model evaluations, {run.passes} model passes (cond/uncond/branch chunks) "
            f"in {run.calc_calls} batched calls; plain CFG would make {run.plain_passes} ({change:+.0f}%)")
    if plan is not None and plan.adaptive is not None:
        adaptive = run.guidance.adaptive
        stops = ", ".join(f"{name} off after evaluation {index + 1}" for name, index in adaptive.switched.items())
        stops += "".join(f"{', ' if stops else ''}{name} off for {int(rows.sum())} of {rows.numel()} samples (its pass "
                         f"runs until all are)" for name, rows in adaptive.rows_off.items()
                         if name not in adaptive.switched and bool(rows.any()))
        if plan.adaptive.starts_switched:
            stops = "off from the start (threshold −1)"
        line += f". {plan.adaptive.label}: {stops or 'nothing switched off'}"
        if plan.adaptive.linear:
            line += f"; LinearAG estimated the uncond {adaptive.estimated}×"
        if adaptive.last_cosine:
            line += "; last cosines " + ", ".join(f"{k} {v:.4f}" for k, v in adaptive.last_cosine.items())
    return line


class CalcCondBatchHook:
    """Our occupant of the single ``sampler_calc_cond_batch_function`` slot (chains to ``previous``)."""

    is_guidance_kit = True

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, args):
        return evaluate_batch(args, self.previous)


def install_engine(model_patcher) -> None:
    """Install the engine's hooks on a (cloned) ModelPatcher; a no-op when already installed."""
    mo = model_patcher.model_options
    current = mo.get("sampler_calc_cond_batch_function")
    if not getattr(current, "is_guidance_kit", False):
        model_patcher.set_model_sampler_calc_cond_batch_function(CalcCondBatchHook(previous=current))
    if pre_cfg_hook not in mo.get("sampler_pre_cfg_function", []):
        model_patcher.set_model_sampler_pre_cfg_function(pre_cfg_hook)
    if post_cfg_hook not in mo.get("sampler_post_cfg_function", []):
        model_patcher.set_model_sampler_post_cfg_function(post_cfg_hook)
    if not model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                           outer_sample_wrapper)


def apply_plan(model_patcher, plan: GuidancePlan):
    """Clone, set the plan, install the engine. Never mutates the input model."""
    m = model_patcher.clone()
    m.model_options[PLAN_KEY] = plan
    if plan.needs_uncond_at_cfg_one:
        m.model_options["disable_cfg1_optimization"] = True
    install_engine(m)
    return m


def plan_of(model_patcher) -> GuidancePlan:
    return get_plan(model_patcher.model_options) or GuidancePlan()


# ------------------------------------------------------------------------------------------------
# per-step context
# ------------------------------------------------------------------------------------------------

def parameterization_of(model) -> str:
    sampling = getattr(model, "model_sampling", None)
    return "flow" if isinstance(sampling, comfy.model_sampling.CONST) else "ve"


_PERCENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model_sampling → {σ: percent} (a cache)


def sigma_progress(model_sampling, sigma: float) -> float:
    """ComfyUI's percent of ``sigma`` for this model_sampling (0 = σ_max, 1 = σ = 0): the progress every
    schedule and window of the pack is written over (``guiders/progress.py``). Cached per model_sampling
    object (a ModelSamplingFlux/SD3 node installs a new one, so a shift change is a new cache)."""
    try:
        cache = _PERCENTS.setdefault(model_sampling, {})
    except TypeError:  # not weak-referenceable: compute every time
        cache = {}
    value = cache.get(sigma)
    if value is None:
        value = percent_of_sigma(sigma, model_sampling.percent_to_sigma)
        if len(cache) > 4096:
            cache.clear()
        cache[sigma] = value
    return value


def _call_sigmas(run: RunState, model_options: dict) -> list[float] | None:
    """This sampler call's sigmas (None for a sampler outside CFGGuider, which does not publish them)."""
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sigmas is None:
        return None
    if run.sigmas is None or run.sigmas_ref is not sigmas:
        run.sigmas = [float(s) for s in sigmas.detach().float().cpu().tolist()]
        run.sigmas_ref = sigmas
    return run.sigmas


def sigma_value(sigma) -> float:
    return float(torch.as_tensor(sigma).reshape(-1)[0])


def _position(run: RunState, model_options: dict, model, sigma) -> StepPosition:
    value = sigma_value(sigma)
    sampling = model.model_sampling
    progress = sigma_progress(sampling, value)
    sigmas = _call_sigmas(run, model_options)
    if sigmas is None:
        # no schedule published (a sampler outside CFGGuider): progress still comes from σ; zero-init,
        # which needs the call's first steps, cannot act
        return StepPosition(progress=progress, step=0.0, n_steps=1, from_noise=False)
    from_noise = sigma_progress(sampling, sigmas[0]) <= FROM_NOISE_PERCENT
    return StepPosition(progress=progress, step=step_in_call(sigmas, value), n_steps=len(sigmas) - 1,
                        from_noise=from_noise)


def run_plan(plan: GuidancePlan, run: RunState, model) -> GuidancePlan:
    """The plan with its model-dependent defaults resolved for the sampled model (cached per run)."""
    if run.plan_source is not plan:
        run.plan_source = plan
        run.parameterization = parameterization_of(model)
        run.plan = plan.for_model(run.parameterization)
        _warn_zero_init(run.plan, run)
    return run.plan


def _warn_zero_init(plan: GuidancePlan, run: RunState) -> None:
    z = plan.cfg_zero_star
    if z is None or not z.zero_init_steps or run.parameterization == "flow":
        return
    run.warn_once("zero-init-eps", f"{z.label}: zero-init is on for a model that is not a flow model (SD1.5, SDXL "
                                   f"and other eps/v models): its first {z.zero_init_steps} step(s) keep their noise, "
                                   f"which shows as dark or noisy blobs. The paper's code zero-inits flow models only; "
                                   f"set zero_init_steps to -1 (automatic) or 0.")


def _check_windows(plan: GuidancePlan, run: RunState, model_options: dict, model) -> None:
    """Once per sampler call, every window of the plan (``check_window_reachable``)."""
    if run.windows_checked:
        return
    run.windows_checked = True
    sigmas = _call_sigmas(run, model_options)
    for label, schedule in plan.windows():
        check_window_reachable(label, schedule.window, sigmas, model.model_sampling)


def check_window_reachable(label: str, window: Window, sigmas: list[float] | None, model_sampling) -> None:
    """A window that no step of a whole run reaches is an error (GuidanceRuntimeError); in a sampler call that is
    one part of a split run (it does not start from pure noise, or does not end at σ = 0) it is logged instead."""
    if sigmas is None or len(sigmas) < 2 or window.is_full:
        return
    percents = [sigma_progress(model_sampling, s) for s in sigmas]
    try:
        window.check_reachable(label, sigmas, percents)
    except ValueError as e:
        if percents[0] <= FROM_NOISE_PERCENT and sigmas[-1] == 0.0:
            raise GuidanceRuntimeError(str(e)) from None
        log.info(f"{PACK}: {label} acts in no step of this sampler call (progress {percents[0]:.3g} to "
                 f"{percents[-2]:.3g}), one part of a split run or a partial denoise; it acts inside its window only.")


# ------------------------------------------------------------------------------------------------
# batched evaluation
# ------------------------------------------------------------------------------------------------

def _branch_conds(branch: Branch, conds: list, model_options: dict) -> list | None:
    if branch.source == "cond":
        source = conds[0]
    elif branch.source == "uncond":
        source = conds[1] if len(conds) > 1 else None
    else:
        extra = model_options.get(EXTRA_CONDS_KEY, {})
        if branch.source not in extra:
            raise GuidanceRuntimeError(
                f"{PACK}: the term needing branch '{branch.name}' needs the '{branch.source}' conditioning, "
                f"which only the Guidance Guider node provides; sample with it (SamplerCustomAdvanced).")
        source = extra[branch.source]
    if source is None:
        return None
    rewrite = getattr(branch.perturbation, "rewrite_cond", None)
    out = []
    for c in source:
        copy = dict(c)
        # a stable id per (cond, branch): caches keyed by uuid must not mix a branch with its cond
        copy["uuid"] = uuid.uuid5(c["uuid"], branch.name) if isinstance(c.get("uuid"), uuid.UUID) else uuid.uuid4()
        out.append(rewrite(copy) if rewrite is not None else copy)
    return out


def with_branch_map(model_options: dict, branch_map: dict[int, Branch]) -> dict:
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    to[BRANCH_MAP_KEY] = branch_map
    mo["transformer_options"] = to
    return mo


def _with_transformer_option(model_options: dict, key: str, value) -> dict:
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    to[key] = value
    mo["transformer_options"] = to
    return mo


def _region_recorder(plan: GuidancePlan, position: StepPosition, sigma, x, guided: bool):
    """S-CFG: a recorder for this evaluation's attention maps when S-CFG acts here (else None)."""
    sc = plan.scfg
    if sc is None or not guided or x.ndim != 4 or not sc.active(position.progress, sigma_value(sigma)):
        return None
    return RegionRecorder(tuple(x.shape[-2:]), sc.downsample, sc.order, sc.reference,
                          step_index=position.step_index)


def _finish_regions(plan: GuidancePlan, recorder, model_options: dict, run: RunState):
    if recorder is None:
        return None
    regions = recorder.finish()
    if regions is None:
        raise GuidanceRuntimeError(
            f"{plan.scfg.label}: no cross-attention map was recorded in this step, so S-CFG cannot build its "
            f"regions. Either no attention layer is at 1/{plan.scfg.downsample} of the latent resolution or coarser "
            f"(lower 'downsample'; SDXL has none at 1/8), or another node replaced Guidance Kit's attention "
            f"patches after the S-CFG node (put S-CFG after it).")
    store = model_options.get(REGION_STORE_KEY)
    if store is not None:
        store.record(run, regions)
    return regions


def _run_batch(model, batch: list, x, sigma, model_options: dict, previous, args: dict) -> list:
    if previous is None:
        return comfy.samplers.calc_cond_batch(model, batch, x, sigma, model_options)
    # another pack's calc-cond-batch function: it only understands [cond, uncond]
    head = previous({**args, "conds": batch[:2], "model_options": model_options})
    if len(batch) > 2:
        head = list(head) + comfy.samplers.calc_cond_batch(model, [None, None] + batch[2:], x, sigma,
                                                           model_options)[2:]
    return list(head)


def evaluate_batch(args: dict, previous=None) -> list:
    """The calc-cond-batch slot: one batched call for every evaluation the plan needs this step."""
    model_options = args["model_options"]
    plan = get_plan(model_options)
    conds = list(args["conds"])
    x, sigma, model = args["input"], args["sigma"], args["model"]
    if plan is None or plan.is_empty:
        return _run_batch(model, conds, x, sigma, model_options, previous, args)
    run = run_state(model_options)
    plan = run_plan(plan, run, model)
    _check_windows(plan, run, model_options, model)
    position = _position(run, model_options, model, sigma)
    need: Needs = needs(plan, position, sigma_value(sigma), run.guidance)
    cond_list = conds[0]
    uncond_list = conds[1] if len(conds) > 1 else None
    run_cond = need.cond and cond_list is not None
    run_uncond = need.uncond and uncond_list is not None
    branch_map: dict[int, Branch] = {}
    if run_uncond and plan.icg is not None:
        uncond_list = _branch_conds(plan.icg.branch, conds, model_options)
        branch_map[1] = plan.icg.branch
    elif run_uncond and need.uncond_branch is not None:  # the uncond comes from a second model (or weights)
        uncond_list = _branch_conds(need.uncond_branch, conds, model_options)
        branch_map[1] = need.uncond_branch
    batch = [cond_list if run_cond else None, uncond_list if run_uncond else None] + conds[2:]
    for branch in need.branches:
        branch_map[len(batch)] = branch
        batch.append(_branch_conds(branch, conds, model_options))
    call_options = with_branch_map(model_options, branch_map) if branch_map else model_options
    recorder = _region_recorder(plan, position, sigma, x, run_cond and run_uncond)
    if recorder is not None:
        call_options = _with_transformer_option(call_options, REGION_RECORDER_KEY, recorder)
    if any(c is not None for c in batch):
        out = run_with_second_models(lambda b: _run_batch(model, b, x, sigma, call_options, previous, args), batch,
                                     branch_map, model, x, sigma, call_options, run.second_models)
        run.calc_calls += 1
    else:
        out = [torch.zeros_like(x) for _ in batch]
    run.evaluations += 1
    run.passes += sum(c is not None for c in batch)
    run.plain_passes += sum(c is not None for c in conds)
    branches = {b.name: out[i] for i, b in branch_map.items()}
    estimated = None
    if not need.cond:  # zero-init step: no model call, D̂ = x
        cond_out = x
        uncond_out = x
    else:
        cond_out = out[0]
        uncond_out = out[1] if run_uncond or uncond_list is None else cond_out
        extra = {k: v for k, v in branches.items() if (plan.icg is None or k != plan.icg.branch.name) and
                 (plan.uncond_model is None or k != plan.uncond_model.branch.name)}
        estimated = after_evaluation(plan, run.guidance, need, position, x, sigma, cond_out,
                                     out[1] if run_uncond else None, extra)
        if estimated is not None and uncond_list is not None:
            uncond_out = estimated
    run.stash = StepStash(
        x=x, position=position, parameterization=parameterization_of(model),
        branches=branches,
        uncond_evaluated=run_uncond or (estimated is not None and uncond_list is not None),
        uncond_skipped_by_plan=uncond_list is not None and not run_uncond and estimated is None,
        regions=_finish_regions(plan, recorder, model_options, run),
    )
    return [cond_out, uncond_out] + list(out[2:len(conds)])


def _evaluate_without_slot(args: dict, plan: GuidancePlan, run: RunState, cond_list, uncond_list,
                           cond_pred, uncond_pred, reason: str) -> StepStash:
    """Our calc-cond-batch slot did not run this step: evaluate branches separately."""
    model_options, x, sigma, model = args["model_options"], args["input"], args["sigma"], args["model"]
    _check_windows(plan, run, model_options, model)
    position = _position(run, model_options, model, sigma)
    need = needs(plan, position, sigma_value(sigma), run.guidance)
    branches = {}
    evaluated = uncond_list is not None and uncond_pred is not None
    extra = list(need.branches)
    substitute = plan.icg.branch if plan.icg is not None else need.uncond_branch
    if substitute is not None and evaluated:
        extra.append(substitute)
    override = None
    if extra:
        run.warn_once("separate-forward", f"{PACK}: {reason}; extra guidance branches run as separate "
                                          f"forwards (slower, same result).")
        conds = [cond_list, uncond_list]
        batch, branch_map = [None, None], {}
        for b in extra:
            branch_map[len(batch)] = b
            batch.append(_branch_conds(b, conds, model_options))
        call_options = with_branch_map(model_options, branch_map)
        out = run_with_second_models(lambda b: comfy.samplers.calc_cond_batch(model, b, x, sigma, call_options), batch,
                                     branch_map, model, x, sigma, call_options, run.second_models)
        branches = {b.name: out[i] for i, b in branch_map.items()}
        if substitute is not None and evaluated:
            override = branches.pop(substitute.name)
    return StepStash(x=x, position=position, parameterization=parameterization_of(model), branches=branches,
                     uncond_evaluated=evaluated, uncond_skipped_by_plan=False, uncond_override=override)


# ------------------------------------------------------------------------------------------------
# combine and hand back
# ------------------------------------------------------------------------------------------------

def _check_cfg_scale(plan: GuidancePlan, run: RunState, cond_scale: float, uncond_evaluated: bool) -> None:
    if run.cfg_checked:
        return
    run.cfg_checked = True
    for key, note in plan.cfg_notes(cond_scale):
        run.warn_once(key, note)
    if math.isclose(cond_scale, 1.0):
        inactive = plan.inactive_at_cfg_one(uncond_evaluated)
        if inactive:
            run.warn_once("cfg1", f"{PACK}: the sampler's cfg is 1, so there is no CFG direction to modify: "
                                  f"{', '.join(inactive)} have no effect in this run. Raise cfg (e.g. 4–8), or "
                                  f"remove those nodes for distilled models that run at cfg 1.")


def _guided(plan: GuidancePlan, run: RunState, stash: StepStash, x, sigma, cond_scale: float,
            cond_pred, uncond_pred) -> tuple[torch.Tensor, torch.Tensor | None]:
    inp = StepInputs(x=x, sigma=sigma, cond_scale=cond_scale, position=stash.position,
                     parameterization=stash.parameterization, cond=cond_pred,
                     uncond=uncond_pred if stash.uncond_evaluated else None, branches=stash.branches,
                     regions=stash.regions)
    if plan.scfg is not None and stash.regions is None and stash.uncond_evaluated and \
            plan.scfg.active(stash.position.progress, inp.sigma_value):
        run.warn_once("scfg-no-maps", f"{plan.scfg.label}: this step ran outside Guidance Kit's batched evaluation "
                                      f"(another node took the calc-cond-batch slot), so no attention map was read "
                                      f"and S-CFG acts as plain CFG here.")
    guided, uncond_rewritten = combine(plan, inp, run.guidance)
    if not bool(torch.isfinite(guided).all()):
        raise GuidanceRuntimeError(_nonfinite_message(plan, inp))
    _check_beta_cfg_strength(plan, run, cond_scale)
    return guided, uncond_rewritten


BETA_WEAK_SCALE = 1.0  # β-CFG at its peak acting below CFG 1: the result leans towards the unconditional prediction


def _check_beta_cfg_strength(plan: GuidancePlan, run: RunState, cond_scale: float) -> None:
    """β-CFG's cfg is a guidance length, not a CFG scale: say so when, at its peak (mid-run), it amounts to a CFG
    scale below 1, i.e. the image is pulled towards the unconditional prediction instead of the prompt."""
    seen = run.guidance.beta_effective
    if plan.beta_cfg is None or seen is None or not 0.35 <= seen[0] <= 0.65:
        return
    effective = seen[1]
    if effective >= BETA_WEAK_SCALE or effective <= 0.0:
        return
    run.warn_once("beta-cfg-weak", (
        f"{plan.beta_cfg.label}: at cfg {cond_scale:g} its guidance at mid-run amounts to a CFG scale of only "
        f"{effective:.2g} on this model and latent size (below 1, so the result leans towards the unconditional "
        f"prediction, away from the prompt). β-CFG's cfg is a guidance length, not a CFG scale: to act like CFG ≈ 5 "
        f"at mid-run, use cfg ≈ {cond_scale * 5.0 / effective:.3g} (or normalization 'L2 (paper)' on small latents)."))


def _nonfinite_message(plan: GuidancePlan, inp: StepInputs) -> str:
    where = (f"at step {inp.position.step_index + 1} of {inp.position.n_steps} of this sampler call (sigma "
             f"{inp.sigma_value:.4g}, progress {inp.position.progress:.3f})")
    sources = [("cond", inp.cond), ("uncond", inp.uncond)] + list(inp.branches.items())
    for name, t in sources:
        if t is not None and not bool(torch.isfinite(t).all()):
            return (f"{PACK}: the model returned NaN/inf in its {name} prediction {where}. This comes from the "
                    f"model, not the guidance: try fp32 / --force-fp32, a different VAE/precision setting, "
                    f"or a lower resolution.")
    methods = [m.label for m in (plan.tcfg, plan.cfg_zero_star, plan.apg, plan.fdg, plan.beta_cfg, plan.rescale)
               if m is not None] + [t.label for t in plan.extra]
    return (f"{PACK}: the guided prediction became NaN/inf {where} with finite model outputs; methods in the plan: "
            f"{', '.join(methods) or 'CFG only'}. Lower the cfg or the methods' scales.")


def pre_cfg_hook(args: dict) -> list:
    model_options = args["model_options"]
    plan = get_plan(model_options)
    conds_out = list(args["conds_out"])
    if plan is None or plan.is_empty or len(conds_out) < 2:
        return conds_out
    run = run_state(model_options)
    plan = run_plan(plan, run, args["model"])
    x = args["input"]
    cond_scale = float(args["cond_scale"])
    conds = args.get("conds") or [None, None]
    _check_cfg_scale(plan, run, cond_scale, uncond_evaluated=conds[1] is not None)
    stash = run.stash if run.stash is not None and run.stash.x is x else None
    run.stash = None
    if stash is None:
        stash = _evaluate_without_slot(args, plan, run, conds[0], conds[1], conds_out[0],
                                       conds_out[1] if conds[1] is not None else None,
                                       "another node replaced the sampler_calc_cond_batch_function slot")
    cond_pred = conds_out[0]
    if stash.uncond_override is not None:
        conds_out[1] = stash.uncond_override
    guided, uncond_rewritten = _guided(plan, run, stash, x, args["sigma"], cond_scale, cond_pred, conds_out[1])
    if uncond_rewritten is not None:
        uncond_hand = uncond_rewritten
    elif stash.uncond_skipped_by_plan:
        uncond_hand = cond_pred
    else:
        uncond_hand = conds_out[1]
    plain = uncond_hand + (cond_pred - uncond_hand) * cond_scale
    run.delta = (x, guided - plain)
    return [cond_pred, uncond_hand] + conds_out[2:]


def post_cfg_hook(args: dict) -> torch.Tensor:
    model_options = args["model_options"]
    plan = get_plan(model_options)
    denoised = args["denoised"]
    if plan is None or plan.is_empty:
        return denoised
    run = run_state(model_options)
    plan = run_plan(plan, run, args["model"])
    x = args["input"]
    if run.delta is not None and run.delta[0] is x:
        delta = run.delta[1]
        run.delta = None
        return denoised + delta
    # the pre-cfg list was bypassed (e.g. ComfyUI's DualCFGGuider): combine here instead
    run.warn_once("post-cfg-fallback", f"{PACK}: this guider bypasses ComfyUI's pre-cfg hooks; the guidance plan is "
                                       f"applied after CFG instead (same result for the plan's own methods).")
    cond_scale = float(args["cond_scale"])
    cond_pred, uncond_pred = args["cond_denoised"], args["uncond_denoised"]
    uncond_list = args.get("uncond")
    _check_cfg_scale(plan, run, cond_scale, uncond_evaluated=uncond_list is not None)
    stash = run.stash if run.stash is not None and run.stash.x is x else None
    run.stash = None
    if stash is None:
        fwd_args = {"model_options": model_options, "input": x, "sigma": args["sigma"], "model": args["model"]}
        stash = _evaluate_without_slot(fwd_args, plan, run, args.get("cond"), uncond_list, cond_pred,
                                       uncond_pred if uncond_list is not None else None,
                                       "this guider bypasses the batched evaluation")
    if stash.uncond_override is not None:
        uncond_pred = stash.uncond_override
    guided, _ = _guided(plan, run, stash, x, args["sigma"], cond_scale, cond_pred, uncond_pred)
    plain = args["uncond_denoised"] + (cond_pred - args["uncond_denoised"]) * cond_scale
    return denoised + (guided - plain)


# ------------------------------------------------------------------------------------------------
# second models: branches evaluated on another ModelPatcher (Autoguidance, Unconditional Priors, NPO checkpoint)
# ------------------------------------------------------------------------------------------------
# The second ModelPatcher is registered on the sampled model's clone with ``set_additional_models`` under
# ``guidance_kit_second_model/<branch>``: ``prepare_sampling`` loads it with the sampled model (one memory
# budget) and model management offloads it as usual. Nothing of it is kept in model_options (deep-copied on
# every clone); the plan's Branch only names the key. In a step, ``run_with_second_models`` takes the entries
# whose branch is an ``OtherModel`` out of the sampled model's batched call and evaluates them with
# ``calc_cond_batch`` on the second model (same x, σ and conditioning; its own model_options and wrappers).

SECOND_MODEL_KEY_PREFIX = "guidance_kit_second_model/"


@dataclass(frozen=True)
class OtherModel:
    """A Branch perturbation: evaluate this branch on the additional model registered under ``key``."""

    label: str
    key: str


def second_model_key(branch_name: str) -> str:
    return SECOND_MODEL_KEY_PREFIX + branch_name


def check_second_models(main_patcher) -> None:
    """At sampling start: every registered second model still fits the sampled model."""
    if main_patcher is None:
        return
    for key, models in main_patcher.additional_models.items():
        if not key.startswith(SECOND_MODEL_KEY_PREFIX):
            continue
        for second in models:
            label = key[len(SECOND_MODEL_KEY_PREFIX):]
            if second.model is main_patcher.model:
                raise second_model.SecondModelError(
                    f"{label}: the second model shares its weights with the sampled model; it must come from its own "
                    f"checkpoint loader (LoRA-patched clones are handled by the node itself).")
            second_model.check_compatible(main_patcher, second, label, "second model")


def _attached_second_model(model, key: str, label: str):
    patcher = getattr(model, "current_patcher", None)
    models = patcher.get_additional_models_with_key(key) if patcher is not None else []
    if not models:
        raise second_model.SecondModelError(
            f"{label}: the second model is not attached to the model being sampled (was the {label} node's output "
            f"connected to the sampler, and is the sampler a ComfyUI sampler / the Guidance Guider?).")
    return models[0]


def _second_model_options(second, model_options: dict) -> dict:
    """The second model's own model_options for a calc_cond_batch call, with this run's sigmas."""
    import comfy.model_patcher
    import comfy.patcher_extension

    mo = comfy.model_patcher.create_model_options_clone(second.model_options)
    to = mo.setdefault("transformer_options", {})
    to["wrappers"] = comfy.patcher_extension.copy_nested_dicts(second.wrappers)
    to["callbacks"] = comfy.patcher_extension.copy_nested_dicts(second.callbacks)
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sigmas is not None:
        to["sample_sigmas"] = sigmas
    return mo


def _second_model_ready(second, used: dict) -> None:
    """``calc_cond_batch`` reads ``model.current_patcher``; ComfyUI sets it for the sampled model only."""
    if getattr(second.model, "current_patcher", None) is not second:
        second.pre_run()
    used[id(second)] = second


def run_with_second_models(run_main, batch: list, branch_map: dict, model, x, sigma, model_options: dict,
                           used: dict) -> list:
    """Evaluate ``batch``: OtherModel entries on their models, everything else through ``run_main``."""
    main_batch = list(batch)
    groups: dict[str, list[int]] = {}
    labels: dict[str, str] = {}
    for index, branch in branch_map.items():
        p = getattr(branch, "perturbation", None)
        if isinstance(p, OtherModel) and index < len(batch) and batch[index] is not None:
            groups.setdefault(p.key, []).append(index)
            labels[p.key] = p.label
            main_batch[index] = None
    if not groups:
        return list(run_main(batch))
    if any(c is not None for c in main_batch):
        out = list(run_main(main_batch))
    else:
        out = [torch.zeros_like(x) for _ in batch]
    for key, indices in groups.items():
        second = _attached_second_model(model, key, labels[key])
        _second_model_ready(second, used)
        preds = comfy.samplers.calc_cond_batch(second.model, [batch[i] for i in indices], x, sigma,
                                               _second_model_options(second, model_options))
        for i, pred in zip(indices, preds):
            out[i] = pred
    return out


def release_second_models(used: dict) -> None:
    for second in used.values():
        if getattr(second.model, "current_patcher", None) is second:
            second.model.current_patcher = None
    used.clear()
