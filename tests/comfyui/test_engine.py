"""The engine inside ComfyUI: batched extra branches, hand-back to ComfyUI's hooks, run state,
composition with core nodes and samplers, and its errors."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import pytest
import torch

from guidance_kit.guiders.methods.apg import APG
from guidance_kit.guiders.methods.extra_guidance import ExtraGuidance
from guidance_kit.guiders.plan import Branch, BranchEffect
from guidance_kit.guiders.schedules import Schedule, Window
from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes.runtime import install
from guidance_kit.nodes.runtime.attention_layout import as_range, select_rows, split_rows
from guidance_kit.nodes.runtime.engine import BRANCH_MAP_KEY, PLAN_KEY, GuidanceRuntimeError, apply_plan, plan_of
from guidance_kit.nodes.runtime.rows import Forward
from guidance_kit.nodes.runtime.slots import Contributor
from tests.comfyui.harness import (
    FAMILIES,
    conditioning,
    counted,
    custom_advanced,
    ksample,
    latent,
    noise_for,
    out,
    rel_diff,
    tiny_model,
)

CFG = 5.0
STEPS = 5


class HalfValues(BranchEffect):
    """Test perturbation: attention with values halved (so the attention output is halved)."""

    def attention(self, func, q, k, v, *args, **kwargs):
        if v.ndim == q.ndim or v.shape[0] == q.shape[0]:
            return func(q, k, v * 0.5, *args, **kwargs)
        raise AssertionError("unexpected layout")


class HalfValuesContributor(Contributor):
    """Its contributor in the attention slot: every attention call of the branch's rows."""

    NAME = "test:half-values"

    def attention(self, call, inner):
        groups = Forward(call.options, call.batch_size).of_type(HalfValues)
        if not groups:
            return inner(call)
        return split_rows(call.batch_size, groups,
                          lambda p, rows: p.attention(call.func, *call.rows(rows).args, **call.rows(rows).kwargs),
                          lambda rows: inner(call.rows(rows)))


def with_test_term(model, scale=2.0, schedule=None):
    term = ExtraGuidance(Branch("test:half-values", source="cond", perturbation=HalfValues()), scale=scale,
                         schedule=schedule or Schedule(), label="Test term")
    m = apply_plan(model, plan_of(model).with_extra(term))
    install.attention(m, HalfValuesContributor())
    return m


def separate_forward_reference(model, scale=2.0):
    """What PAG-style nodes do: an extra calc_cond_batch per step, perturbation on all its rows."""
    perturb = HalfValues()

    def override(func, *args, **kwargs):
        return perturb.attention(func, *args, **kwargs)

    def post_cfg(args):
        mo = dict(args["model_options"])
        to = dict(mo.get("transformer_options", {}))
        to["optimized_attention_override"] = override
        mo["transformer_options"] = to
        pert = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], mo)[0]
        return args["denoised"] + scale * (args["cond_denoised"] - pert)

    m = model.clone()
    m.set_model_sampler_post_cfg_function(post_cfg)
    return m


@pytest.mark.parametrize("family", FAMILIES)
def test_extra_branch_is_batched_and_equals_a_separate_forward(family):
    base = tiny_model(family)
    batched, counter = counted(with_test_term(base))
    got = ksample(batched, family, CFG, STEPS)
    reference_model, ref_counter = counted(separate_forward_reference(base))
    reference = ksample(reference_model, family, CFG, STEPS)
    assert rel_diff(got, reference) <= 1e-4
    assert counter.batches == [3] * STEPS  # cond, uncond and the branch in one forward per step
    assert ref_counter.batches == [2, 1] * STEPS
    assert rel_diff(got, ksample(base, family, CFG, STEPS)) > 1e-3


@pytest.mark.parametrize("family", ["sd15", "flux", "wan21"])
def test_extra_branch_result_survives_comfyui_splitting_the_batch(family, monkeypatch):
    base = tiny_model(family)
    together = ksample(with_test_term(base), family, CFG, STEPS)
    # ComfyUI splits the batch when the model's estimated memory exceeds free memory
    monkeypatch.setattr(base.model, "memory_required", lambda *a, **k: float("inf"))
    split_model, counter = counted(with_test_term(base))
    split = ksample(split_model, family, CFG, STEPS)
    assert counter.batches == [1] * (3 * STEPS)  # memory pressure: one chunk per forward
    assert rel_diff(split, together) <= 1e-5


def test_extra_branch_window_costs_no_call_outside_it():
    base = tiny_model("flux")
    model, counter = counted(with_test_term(base, schedule=Schedule(window=Window(start=0.0, end=0.5))))
    ksample(model, "flux", CFG, STEPS)
    assert counter.batches == [3, 3, 3, 2, 2]


def test_extra_branch_at_cfg_one_needs_no_uncond():
    base = tiny_model("sd15")
    model, counter = counted(with_test_term(base))
    result = ksample(model, "sd15", 1.0, STEPS)
    assert counter.batches == [2] * STEPS and torch.isfinite(result).all()


def test_branch_map_reaches_the_model_only_in_the_branch_call():
    seen = []

    def spy(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        transformer_options = transformer_options or {}
        seen.append((transformer_options.get("cond_or_uncond"), set(transformer_options.get(BRANCH_MAP_KEY, {}))))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    m = with_test_term(tiny_model("sd3"))
    import comfy.patcher_extension
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "spy", spy)
    ksample(m, "sd3", CFG, 2)
    assert seen and all(sorted(chunks) == [0, 1, 2] and branches == {2} for chunks, branches in seen)


# --- hand-back and composition with ComfyUI's own nodes and samplers --------------------------------
def core_nodes():
    from comfy_extras.nodes_apg import APG as CoreAPG
    from comfy_extras.nodes_cfg import CFGZeroStar as CoreCFGZeroStar
    from comfy_extras.nodes_model_advanced import RescaleCFG as CoreRescaleCFG
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance as CorePAG
    from comfy_extras.nodes_tcfg import TCFG as CoreTCFG

    return {
        "core_apg": lambda m: out(CoreAPG.execute(m, eta=1.0, norm_threshold=5.0, momentum=0.0)),
        "core_pag": lambda m: out(CorePAG.execute(m, scale=3.0)),
        "core_cfg_zero_star": lambda m: out(CoreCFGZeroStar.execute(m)),
        "core_tcfg": lambda m: out(CoreTCFG.execute(m)),
        "core_rescale_cfg": lambda m: out(CoreRescaleCFG().patch(m, 0.7)),
    }


def our_stack(model):
    model = out(cm.APGNode.execute(model, eta=0.0, norm_threshold=15.0, momentum=-0.5))
    model = out(cm.TCFGNode.execute(model))
    return out(cm.CFGSchedule.execute(model, schedule="linear_increasing", power=2.0, step_values="1",
                                      start_percent=0.0, end_percent=1.0, sigma_high=1000.0, sigma_low=0.0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("core", ["core_apg", "core_pag", "core_cfg_zero_star", "core_tcfg", "core_rescale_cfg"])
@pytest.mark.parametrize("order", ["ours_first", "core_first"])
def test_stacks_with_core_guidance_nodes(family, core, order):
    base = tiny_model(family)
    apply_core = core_nodes()[core]
    model = apply_core(our_stack(base)) if order == "ours_first" else our_stack(apply_core(base))
    result = ksample(model, family, CFG, STEPS)
    assert torch.isfinite(result).all()
    assert rel_diff(result, ksample(our_stack(base), family, CFG, STEPS)) > 1e-4 or core == "core_pag"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_core_cfg_pp_samplers_see_the_plans_uncond(family, sampler):
    base = tiny_model(family)
    plain = ksample(base, family, 1.0, STEPS, sampler=sampler)
    tcfg = out(cm.TCFGNode.execute(base))  # TCFG rewrites the uncond: CFG++ re-noises with the rewritten one
    result = ksample(tcfg, family, 1.0, STEPS, sampler=sampler)
    assert torch.isfinite(result).all()
    assert rel_diff(result, plain) > 1e-4
    stacked = ksample(our_stack(base), family, 1.5, STEPS, sampler=sampler)
    assert torch.isfinite(stacked).all()


def test_plan_output_equals_combine_when_nothing_else_is_installed():
    """The post-cfg hand-back returns exactly the plan's D̂ (checked against an independent recomputation)."""
    base = tiny_model("sd15")
    captured = []

    def capture(args):
        captured.append((args["denoised"].clone(), args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
        return args["denoised"]

    model = out(cm.APGNode.execute(base, eta=0.0, norm_threshold=0.0, momentum=0.0))
    model.set_model_sampler_post_cfg_function(capture)  # runs after ours
    ksample(model, "sd15", 7.0, 3)
    from guidance_kit.guiders.methods.apg import apg_direction
    for denoised, cond, uncond in captured:
        direction, _ = apg_direction(cond - uncond, cond, 0.0, 0.0, 0.0, None)
        assert torch.allclose(denoised, cond + 6.0 * direction, atol=1e-4)


def test_dualcfg_guider_bypasses_pre_cfg_but_the_plan_still_applies(caplog):
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    base = tiny_model("flux")
    model = out(cm.APGNode.execute(base, eta=0.0, norm_threshold=0.0, momentum=0.0))

    def dual(m):
        g = Guider_DualCFG(m)
        g.set_conds(conditioning("flux", 1), conditioning("flux", 3), conditioning("flux", 2))
        g.set_cfg(CFG, 2.0)
        return custom_advanced(g, "flux", STEPS)

    with caplog.at_level(logging.WARNING, logger="guidance_kit"):
        patched = dual(model)
    assert "bypasses ComfyUI's pre-cfg hooks" in caplog.text
    assert torch.isfinite(patched).all() and rel_diff(patched, dual(base)) > 1e-3


def test_chains_to_a_previous_calc_cond_batch_function():
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiTSimple

    base = tiny_model("flux")
    slg = out(SkipLayerGuidanceDiTSimple.execute(base, double_layers="0", single_layers="0", start_percent=0.0,
                                                 end_percent=1.0))
    ours_on_slg, counter = counted(out(cm.APGNode.execute(slg, eta=0.0, norm_threshold=15.0, momentum=-0.5)))
    ours_alone = out(cm.APGNode.execute(base, eta=0.0, norm_threshold=15.0, momentum=-0.5))
    a = ksample(ours_on_slg, "flux", CFG, STEPS)
    assert rel_diff(a, ksample(ours_alone, "flux", CFG, STEPS)) > 1e-3  # SLG's function still ran
    assert counter.batches == [1, 1] * STEPS  # ... with its own (separate) cond/uncond forwards


# --- run-scoped state ---------------------------------------------------------------------------------
def test_momentum_is_reset_for_every_run():
    model = out(cm.APGNode.execute(tiny_model("wan21"), eta=0.0, norm_threshold=15.0, momentum=-0.75))
    first = ksample(model, "wan21", CFG, STEPS)
    second = ksample(model, "wan21", CFG, STEPS)
    assert torch.equal(first, second)
    # a second sampler continuing the schedule (KSamplerAdvanced-style split) starts its own momentum
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(conditioning("wan21", 1), conditioning("wan21", 2))
    guider.set_cfg(CFG)
    noise = noise_for("wan21")
    sampler = comfy.samplers.sampler_object("euler")
    half = guider.sample(noise, latent("wan21"), sampler, sigmas[:3], seed=0)
    rest_a = guider.sample(torch.zeros_like(noise), half, sampler, sigmas[2:], seed=0)
    rest_b = guider.sample(torch.zeros_like(noise), half, sampler, sigmas[2:], seed=0)
    assert torch.equal(rest_a, rest_b)


def test_nodes_never_mutate_their_input_model():
    base = tiny_model("sd15")
    before = dict(base.model_options)
    patched = out(cm.APGNode.execute(base, eta=0.0, norm_threshold=15.0, momentum=-0.5))
    assert base.model_options == before and PLAN_KEY not in base.model_options
    assert PLAN_KEY in patched.model_options
    out(cm.FDGNode.execute(patched, scales="8, 3"))
    assert plan_of(patched).get("fdg") is None


# --- errors and warnings ------------------------------------------------------------------------------
def test_duplicate_method_node_raises_naming_the_node():
    model = out(cm.APGNode.execute(tiny_model("sd15"), eta=0.0, norm_threshold=15.0, momentum=-0.5))
    with pytest.raises(ValueError, match="APG: this model already has APG"):
        cm.APGNode.execute(model, eta=1.0, norm_threshold=0.0, momentum=0.0)


@pytest.mark.parametrize("node,kwargs,message", [
    (cm.CFGSchedule, dict(schedule="nope", power=2.0, step_values="1", start_percent=0.0, end_percent=1.0,
                          sigma_high=1000.0, sigma_low=0.0), "unknown schedule"),
    (cm.CFGSchedule, dict(schedule="constant", power=2.0, step_values="1", start_percent=0.8, end_percent=0.2,
                          sigma_high=1000.0, sigma_low=0.0), "window is empty"),
    (cm.CFGSchedule, dict(schedule="constant", power=2.0, step_values="1", start_percent=0.0, end_percent=1.0,
                          sigma_high=0.5, sigma_low=0.5), "sigma window is empty"),
    (cm.CFGSchedule, dict(schedule="step_list", power=2.0, step_values="1, x", start_percent=0.0, end_percent=1.0,
                          sigma_high=1000.0, sigma_low=0.0), "not a number"),
    (cm.FDGNode, dict(scales="10"), "at least two"),
    (cm.FDGNode, dict(scales="10, five"), "not a number"),
])
def test_bad_widget_values_fail_validation_with_the_node_name(node, kwargs, message):
    verdict = node.validate_inputs(**kwargs)
    assert isinstance(verdict, str) and message in verdict
    assert verdict.split(":")[0] in ("CFG Schedule", "FDG")
    with pytest.raises(ValueError, match=message):
        node.execute(tiny_model("sd15"), **kwargs)


def test_unreachable_sigma_window_is_an_error_at_sampling_start():
    model = out(cm.CFGSchedule.execute(tiny_model("flux"), schedule="constant", power=2.0, step_values="1",
                                       start_percent=0.0, end_percent=1.0, sigma_high=5.42, sigma_low=2.0))
    with pytest.raises(GuidanceRuntimeError, match="no step of this run falls inside the window"):
        ksample(model, "flux", CFG, STEPS)


def test_cfg_one_warns_which_methods_cannot_act(caplog):
    model = out(cm.APGNode.execute(tiny_model("sd15"), eta=0.0, norm_threshold=15.0, momentum=-0.5))
    model, counter = counted(model)
    with caplog.at_level(logging.WARNING, logger="guidance_kit"):
        result = ksample(model, "sd15", 1.0, STEPS)
    assert "cfg is 1" in caplog.text and "APG" in caplog.text
    assert counter.batches == [1] * STEPS  # no uncond call is paid for
    assert torch.equal(result, ksample(tiny_model("sd15"), "sd15", 1.0, STEPS))


def test_cfg_zero_applies_only_the_unconditional_prediction():
    base = tiny_model("sd3")
    model = out(cm.TCFGNode.execute(base))
    result = ksample(model, "sd3", 0.0, STEPS)
    assert torch.isfinite(result).all()


def test_nan_from_the_model_is_a_clear_error():
    import comfy.patcher_extension

    def poison(executor, *args, **kwargs):
        result = executor(*args, **kwargs)
        result[0, 0] = float("nan")
        return result

    model = out(cm.APGNode.execute(tiny_model("sd15"), eta=0.0, norm_threshold=15.0, momentum=-0.5))
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "poison", poison)
    with pytest.raises(GuidanceRuntimeError, match="model returned NaN/inf"):
        ksample(model, "sd15", CFG, STEPS)


def test_nan_from_the_guidance_names_every_method_of_the_plan():
    from guidance_kit.guiders.combine import StepInputs
    from guidance_kit.guiders.methods.cfg_schedule import CFGSchedule
    from guidance_kit.guiders.methods.icg import IndependentCondition
    from guidance_kit.guiders.plan import GuidancePlan
    from guidance_kit.guiders.progress import StepPosition
    from guidance_kit.nodes.runtime.engine import _nonfinite_message

    plan = GuidancePlan.of(APG(), CFGSchedule(), IndependentCondition(Branch("ICG")),
                           ExtraGuidance(Branch("pag"), 2.0, label="PAG"))
    finite = torch.zeros(1, 4, 8, 8)
    inp = StepInputs(x=finite, sigma=torch.ones(1), cond_scale=CFG, position=StepPosition(progress=0.5),
                     parameterization="ve", cond=finite, uncond=finite)
    message = _nonfinite_message(plan, inp)
    assert "guided prediction became NaN/inf" in message
    assert "methods in the plan: ICG, CFG Schedule, APG, PAG." in message


def test_plan_survives_model_clone_and_is_shared_safely():
    model = out(cm.APGNode.execute(tiny_model("sd15"), eta=0.0, norm_threshold=15.0, momentum=-0.5))
    clone = model.clone()
    assert plan_of(clone) == plan_of(model) and plan_of(clone).get("apg") == APG(0.0, 15.0, -0.5, "APG")
    assert torch.equal(ksample(clone, "sd15", CFG, STEPS), ksample(model, "sd15", CFG, STEPS))


def test_cfg_one_with_a_cfg_pp_sampler_does_not_warn_about_uncond_rewrites(caplog):
    model = out(cm.TCFGNode.execute(tiny_model("sd15")))
    with caplog.at_level(logging.WARNING, logger="guidance_kit"):
        ksample(model, "sd15", 1.0, STEPS, sampler="euler_cfg_pp")
    assert "cfg is 1" not in caplog.text


def test_row_splits_take_a_chunk_as_a_view_and_other_rows_as_copies():
    """A chunk's rows (one range) are a view of the batch; scattered rows a copy; the merged output is the same."""
    x = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    assert as_range(torch.tensor([2, 3, 4])) == slice(2, 5) and as_range(torch.tensor([1, 3])) is None
    assert as_range(torch.tensor([3, 2])) is None and as_range(torch.tensor([], dtype=torch.long)) is None
    chunk = select_rows(x, torch.tensor([2, 3, 4]))
    assert chunk.data_ptr() == x[2].data_ptr() and torch.equal(chunk, x[2:5])
    scattered = select_rows(x, torch.tensor([0, 5]))
    assert scattered.data_ptr() != x.data_ptr() and torch.equal(scattered, x[[0, 5]])
    for rows in (torch.tensor([2, 3, 4]), torch.tensor([0, 2, 5])):
        merged = split_rows(6, [("half", rows)], lambda effect, r: select_rows(x, r) * 0.5,
                            lambda r: select_rows(x, r) + 1.0)
        expected = x + 1.0
        expected[rows] = x[rows] * 0.5
        assert torch.equal(merged, expected)
