"""The guidance engine: evaluates a model's GuidancePlan inside ComfyUI's CFG path.

Installed once per model (idempotent) by every method node:

* ``sampler_calc_cond_batch_function`` (single slot; a previous occupant is kept and called):
  decides per step which evaluations the plan needs (a branch outside its window, the uncond
  outside the CFG window, everything on a CFG-Zero* zero-init step costs nothing) and runs cond,
  uncond **and every extra branch in one** ``calc_cond_batch`` **call**. Branch chunks are marked
  in ``transformer_options[BRANCH_MAP_KEY]`` (batch index → Branch) so the contributors act on
  their chunk only (``rows.py``).
* ``sampler_pre_cfg_function`` (list): combines the predictions (``guiders.combine``), hands the
  (rewritten) uncond back so core CFG, later pre-cfg patches and CFG++ samplers see it, and keeps
  the difference between the plan's result and core CFG for the post-cfg hook.
* ``sampler_post_cfg_function`` (list): adds that difference to whatever ComfyUI's CFG (or a
  ``sampler_cfg_function`` such as RescaleCFG) produced. With nothing else installed the output is
  exactly the plan's D̂; other post-cfg nodes compose additively, in chain order.
* an ``OUTER_SAMPLE`` wrapper that gives every sampling run a fresh ``RunState`` (momentum etc.).

Nothing here is method-specific. A branch's effect (``Branch.perturbation``, a ``BranchEffect``) may rewrite
its conditioning copy (``rewrite_cond``) or run elsewhere (``runner()``: a second model evaluates those
entries instead of the batched call); contributors that record something inside the batched evaluation
(S-CFG's attention maps) register an ``EvaluationHook`` on the model, whose result joins the step's inputs.

If another pack replaces our calc-cond-batch slot, or a guider bypasses the pre-cfg list
(ComfyUI's DualCFGGuider), the plan is still applied (extra branches then run as separate
forwards) and a warning says why it costs more. It never silently does nothing.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field

import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import torch

from ...guiders.combine import GuidanceState, Needs, StepInputs, after_evaluation, combine, needs
from ...guiders.plan import Branch, GuidancePlan
from ...guiders.progress import FROM_NOISE_PERCENT, StepPosition
from ...guiders.schedules import Window
from .rows import BRANCH_MAP_KEY, StepClock, sigma_progress, sigma_value

log = logging.getLogger("guidance_kit")

PLAN_KEY = "guidance_kit_plan"
RUN_KEY = "guidance_kit_run"
EVALUATION_HOOKS_KEY = "guidance_kit_evaluation_hooks"  # model_options: the model's EvaluationHooks (a tuple)
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
    inputs: dict = field(default_factory=dict)  # StepInputs fields the evaluation hooks recorded (S-CFG's regions)


@dataclass
class RunState:
    """Everything that lives for one sampling run and no longer."""

    guidance: GuidanceState = field(default_factory=GuidanceState)
    clock: StepClock = field(default_factory=StepClock)
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
    guider: object = None  # the run's guider: its conds hold the conditionings nodes brought (conditioning_key)
    notes: dict = field(default_factory=dict)  # key → a line of the run's report (e.g. the prefix sharing)

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
    run = RunState(guider=guider)
    guider.model_options[RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options.pop(RUN_KEY, None)
        plan = get_plan(guider.model_options)
        report = call_report(run, plan)
        if report:
            log.info(report)
        finish_run(run, plan)


def finish_run(run: RunState, plan: GuidancePlan | None) -> None:
    """The methods' end-of-run hook (``run_finished``: e.g. Annealing Guidance's plot message); a failure there is
    logged, never raised over the run's result."""
    plan = run.plan or plan
    if plan is None:
        return
    try:
        plan.run_finished(run.guidance)
    except Exception as e:  # noqa: BLE001  (what a method publishes must not fail the sampling)
        log.warning(f"{PACK}: a method's end-of-run hook failed: {e}")


def call_report(run: RunState, plan: GuidancePlan | None) -> str:
    """The NFE counter line logged after each run: model passes made vs plain CFG of the same length."""
    if run.evaluations == 0 or run.plain_passes == 0:
        return ""
    change = 100.0 * (run.passes - run.plain_passes) / run.plain_passes
    line = (f"{PACK}: {run.evaluations} model evaluations, {run.passes} model passes (cond/uncond/branch chunks) "
            f"in {run.calc_calls} batched calls; plain CFG would make {run.plain_passes} ({change:+.0f}%)")
    if plan is not None:
        line += "".join(plan.run_reports(run.guidance))  # e.g. what Adaptive Guidance switched off
    line += "".join(f"; {note}" for note in run.notes.values())
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


def run_plan(plan: GuidancePlan, run: RunState, model) -> GuidancePlan:
    """The plan with its model-dependent defaults resolved for the sampled model (cached per run)."""
    if run.plan_source is not plan:
        run.plan_source = plan
        run.parameterization = parameterization_of(model)
        run.plan = plan.for_model(run.parameterization)
        for key, note in run.plan.model_notes(run.parameterization):  # e.g. CFG-Zero*'s zero-init on an eps model
            run.warn_once(key, note)
    return run.plan


def _check_windows(plan: GuidancePlan, run: RunState, model_options: dict, model) -> None:
    """Once per sampler call, every window of the plan (``check_window_reachable``)."""
    if run.windows_checked:
        return
    run.windows_checked = True
    sigmas = run.clock.call_sigmas(model_options)
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

def _node_conditioning(run: RunState, effect) -> list:
    """The processed conditioning a node brought for a branch (``BranchEffect.conditioning_key``), from the conds of
    the run's guider, where the node's OUTER_SAMPLE wrapper put it so that ComfyUI processes it like the prompts."""
    key = effect.conditioning_key()
    conds = getattr(run.guider, "conds", None)
    found = conds.get(key) if isinstance(conds, dict) else None
    if not found:
        owner = getattr(effect, "owner", key)
        raise GuidanceRuntimeError(f"{owner}: its conditioning input did not reach this sampler (it runs outside "
                                   f"ComfyUI's CFGGuider, which carries it). Sample with KSampler, "
                                   f"SamplerCustom(Advanced) or the Guidance Guider.")
    return found


def _branch_conds(branch: Branch, conds: list, run: RunState | None = None) -> list | None:
    """The conditioning of ``branch``: a copy of the prompt's ("cond") or the negative's ("uncond"), or of the
    conditioning a node brought (its effect's ``conditioning_key``)."""
    effect = branch.perturbation
    if effect is not None and effect.conditioning_key() is not None:
        source = _node_conditioning(run if run is not None else RunState(), effect)
    else:
        source = conds[0] if branch.source == "cond" else (conds[1] if len(conds) > 1 else None)
    if source is None:
        return None
    out = []
    for c in source:
        copy = dict(c)
        # a stable id per (cond, branch): caches keyed by uuid must not mix a branch with its cond
        copy["uuid"] = uuid.uuid5(c["uuid"], branch.name) if isinstance(c.get("uuid"), uuid.UUID) else uuid.uuid4()
        out.append(effect.rewrite_cond(copy) if effect is not None else copy)
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


class EvaluationHook:
    """Something a contributor records inside the batched evaluation (S-CFG's attention maps), registered on the
    model (``add_evaluation_hook``). ``begin`` returns this evaluation's recorder (None: nothing to record), which
    the hooks of the forward find in ``transformer_options[KEY]``; ``finish`` turns it into StepInputs fields."""

    KEY = ""

    def __deepcopy__(self, memo) -> EvaluationHook:
        return self  # stateless: it survives ModelPatcher.clone's deep copy of model_options as itself

    def begin(self, plan: GuidancePlan, position: StepPosition, sigma, x, guided: bool):
        return None

    def finish(self, plan: GuidancePlan, recorder, model_options: dict, run: RunState) -> dict:
        return {}

    def check(self, plan: GuidancePlan, run: RunState, position: StepPosition, sigma: float, inputs: dict,
              uncond_evaluated: bool) -> None:
        """Before the combine: warn where the step needs a recording it does not have."""


def add_evaluation_hook(model_patcher, hook: EvaluationHook) -> None:
    hooks = model_patcher.model_options.get(EVALUATION_HOOKS_KEY, ())
    if hook not in hooks:
        model_patcher.model_options[EVALUATION_HOOKS_KEY] = (*hooks, hook)


def _evaluation_hooks(model_options: dict) -> tuple[EvaluationHook, ...]:
    return model_options.get(EVALUATION_HOOKS_KEY, ())


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
    position = run.clock.position(model_options, model, sigma)
    need: Needs = needs(plan, position, sigma_value(sigma), run.guidance)
    cond_list = conds[0]
    uncond_list = conds[1] if len(conds) > 1 else None
    run_cond = need.cond and cond_list is not None
    run_uncond = need.uncond and uncond_list is not None
    branch_map: dict[int, Branch] = {}
    if run_uncond and need.uncond_branch is not None:  # the uncond comes from ICG, a second model (or weights)
        uncond_list = _branch_conds(need.uncond_branch, conds, run)
        branch_map[1] = need.uncond_branch
    batch = [cond_list if run_cond else None, uncond_list if run_uncond else None] + conds[2:]
    for branch in need.branches:
        branch_map[len(batch)] = branch
        batch.append(_branch_conds(branch, conds, run))
    call_options = with_branch_map(model_options, branch_map) if branch_map else model_options
    recorders = []
    for hook in _evaluation_hooks(model_options):
        recorder = hook.begin(plan, position, sigma, x, run_cond and run_uncond)
        if recorder is not None:
            call_options = _with_transformer_option(call_options, hook.KEY, recorder)
            recorders.append((hook, recorder))
    if any(c is not None for c in batch):
        out = run_with_runners(lambda b: _run_batch(model, b, x, sigma, call_options, previous, args), batch,
                               branch_map, model, x, sigma, call_options)
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
        extra = {k: v for k, v in branches.items() if k not in plan.uncond_branch_names}
        estimated = after_evaluation(plan, run.guidance, need, position, x, sigma, cond_out,
                                     out[1] if run_uncond else None, extra)
        if estimated is not None and uncond_list is not None:
            uncond_out = estimated
    run.stash = StepStash(
        x=x, position=position, parameterization=parameterization_of(model),
        branches=branches,
        uncond_evaluated=run_uncond or (estimated is not None and uncond_list is not None),
        uncond_skipped_by_plan=uncond_list is not None and not run_uncond and estimated is None,
    )
    for hook, recorder in recorders:
        run.stash.inputs.update(hook.finish(plan, recorder, model_options, run))
    return [cond_out, uncond_out] + list(out[2:len(conds)])


def _evaluate_without_slot(args: dict, plan: GuidancePlan, run: RunState, cond_list, uncond_list,
                           cond_pred, uncond_pred, reason: str) -> StepStash:
    """Our calc-cond-batch slot did not run this step: evaluate branches separately."""
    model_options, x, sigma, model = args["model_options"], args["input"], args["sigma"], args["model"]
    _check_windows(plan, run, model_options, model)
    position = run.clock.position(model_options, model, sigma)
    need = needs(plan, position, sigma_value(sigma), run.guidance)
    branches = {}
    evaluated = uncond_list is not None and uncond_pred is not None
    extra = list(need.branches)
    substitute = need.uncond_branch
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
            batch.append(_branch_conds(b, conds, run))
        call_options = with_branch_map(model_options, branch_map)
        out = run_with_runners(lambda b: comfy.samplers.calc_cond_batch(model, b, x, sigma, call_options), batch,
                               branch_map, model, x, sigma, call_options)
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
            cond_pred, uncond_pred, hooks: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    inp = StepInputs(x=x, sigma=sigma, cond_scale=cond_scale, position=stash.position,
                     parameterization=stash.parameterization, cond=cond_pred,
                     uncond=uncond_pred if stash.uncond_evaluated else None, branches=stash.branches,
                     **stash.inputs)
    for hook in hooks:  # e.g. S-CFG without its maps in a step outside the batched evaluation
        hook.check(plan, run, stash.position, inp.sigma_value, stash.inputs, stash.uncond_evaluated)
    guided, uncond_rewritten = combine(plan, inp, run.guidance)
    if not bool(torch.isfinite(guided).all()):
        raise GuidanceRuntimeError(_nonfinite_message(plan, inp))
    for key, note in plan.step_notes(run.guidance, cond_scale):  # e.g. β-CFG acting below CFG 1
        run.warn_once(key, note)
    return guided, uncond_rewritten


def _nonfinite_message(plan: GuidancePlan, inp: StepInputs) -> str:
    where = (f"at step {inp.position.step_index + 1} of {inp.position.n_steps} of this sampler call (sigma "
             f"{inp.sigma_value:.4g}, progress {inp.position.progress:.3f})")
    sources = [("cond", inp.cond), ("uncond", inp.uncond)] + list(inp.branches.items())
    for name, t in sources:
        if t is not None and not bool(torch.isfinite(t).all()):
            return (f"{PACK}: the model returned NaN/inf in its {name} prediction {where}. This comes from the "
                    f"model, not the guidance: try fp32 / --force-fp32, a different VAE/precision setting, "
                    f"or a lower resolution.")
    return (f"{PACK}: the guided prediction became NaN/inf {where} with finite model outputs; methods in the plan: "
            f"{', '.join(plan.labels) or 'CFG only'}. Lower the cfg or the methods' scales.")


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
    guided, uncond_rewritten = _guided(plan, run, stash, x, args["sigma"], cond_scale, cond_pred, conds_out[1],
                                       _evaluation_hooks(model_options))
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
    guided, _ = _guided(plan, run, stash, x, args["sigma"], cond_scale, cond_pred, uncond_pred,
                        _evaluation_hooks(model_options))
    plain = args["uncond_denoised"] + (cond_pred - args["uncond_denoised"]) * cond_scale
    return denoised + (guided - plain)


# ------------------------------------------------------------------------------------------------
# branches evaluated elsewhere (a BranchEffect with a runner: a second model)
# ------------------------------------------------------------------------------------------------

def run_with_runners(run_main, batch: list, branch_map: dict, model, x, sigma, model_options: dict) -> list:
    """Evaluate ``batch``: the entries whose branch effect has a ``runner()`` on that runner (entries of one runner
    together, ``runner.run(model, conds, x, sigma, model_options)``, after ``run_main``), everything else through
    ``run_main``."""
    main_batch = list(batch)
    groups: dict = {}
    for index, branch in branch_map.items():
        runner = branch.perturbation.runner() if branch.perturbation is not None else None
        if runner is not None and index < len(batch) and batch[index] is not None:
            groups.setdefault(runner, []).append(index)
            main_batch[index] = None
    if not groups:
        return list(run_main(batch))
    if any(c is not None for c in main_batch):
        out = list(run_main(main_batch))
    else:
        out = [torch.zeros_like(x) for _ in batch]
    for runner, indices in groups.items():
        # a runner that depends on this step's predictions (SAG) gets the main call's outputs
        main = {}
        if getattr(runner, "USES_MAIN_PREDICTIONS", False):
            main["main"] = [o if c is not None else None for o, c in zip(out, main_batch)]
        preds = runner.run(model, [batch[i] for i in indices], x, sigma, model_options, **main)
        for i, pred in zip(indices, preds):
            out[i] = pred
    return out
