"""The plan: building, errors, stacking every method with every other, dtypes, batches, extra branches."""

import itertools

import pytest
import torch

from guidance_kit.guiders.combine import GuidanceState, combine, needs
from guidance_kit.guiders.methods.apg import APG
from guidance_kit.guiders.methods.beta_cfg import BetaCFG
from guidance_kit.guiders.methods.cfg_schedule import CFGSchedule
from guidance_kit.guiders.methods.cfg_zero_star import CFGZeroStar
from guidance_kit.guiders.methods.extra_guidance import ExtraGuidance
from guidance_kit.guiders.methods.fdg import FDG
from guidance_kit.guiders.methods.rescale import Rescale
from guidance_kit.guiders.methods.tcfg import TCFG
from guidance_kit.guiders.plan import Branch, GuidancePlan, PlanError
from guidance_kit.guiders.schedules import Schedule, Window

from .helpers import cfg_reference, position_at, random_triplet, step_inputs

METHODS = {
    "cfg_schedule": CFGSchedule(Schedule(shape="cosine_increasing"), label="cfg_schedule"),
    "tcfg": TCFG(),
    "cfg_zero_star": CFGZeroStar(True, 1),
    "apg": APG(eta=0.0, norm_threshold=5.0, momentum=-0.5),
    "fdg": FDG(scales=(8.0, 3.0)),
    "beta_cfg": BetaCFG(2.0, 3.0, 1.0),
    "rescale": Rescale(0.7),
}


def plan_with(*slots, extra=()):
    plan = GuidancePlan()
    for slot in slots:
        plan = plan.with_method(METHODS[slot])
    for term in extra:
        plan = plan.with_extra(term)
    return plan


def run_steps(plan, x, c, u, n_steps=6, branches=None, **kw):
    state = GuidanceState()
    outs = []
    for step in range(n_steps):
        inp = step_inputs(x, c, u, step=step, n_steps=n_steps, branches=branches, **kw)
        outs.append(combine(plan, inp, state)[0])
    return outs


def test_duplicate_method_is_an_error_naming_the_node():
    plan = plan_with("apg")
    with pytest.raises(PlanError, match="APG: this model already has APG"):
        plan.with_method(APG(label="APG"))


@pytest.mark.parametrize("slot,bad", [
    ("apg", APG(norm_threshold=-1)), ("apg", APG(momentum=1.0)), ("fdg", FDG(scales=(3.0,))),
    ("beta_cfg", BetaCFG(a=0.5)), ("beta_cfg", BetaCFG(gamma=5.0)), ("rescale", Rescale(1.5)),
    ("cfg_zero_star", CFGZeroStar(False, 0)), ("cfg_zero_star", CFGZeroStar(True, -1)),
    ("cfg_schedule", CFGSchedule(Schedule(window=Window(start=0.9, end=0.1)))),
])
def test_out_of_range_settings_are_errors(slot, bad):
    with pytest.raises(ValueError):
        GuidancePlan().with_method(bad)


@pytest.mark.parametrize("pair", list(itertools.combinations(METHODS, 2)))
def test_every_pair_stacks_and_is_finite(pair):
    x, c, u = random_triplet((2, 4, 16, 16))
    for out in run_steps(plan_with(*pair), x, c, u, cond_scale=7.0):
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 16, 3, 16, 16)])
def test_everything_stacked_is_finite_and_order_free(shape):
    x, c, u = random_triplet(shape)
    slots = list(METHODS)
    a = run_steps(plan_with(*slots), x, c, u, cond_scale=7.0)
    b = run_steps(plan_with(*reversed(slots)), x, c, u, cond_scale=7.0)
    for oa, ob in zip(a, b):
        assert torch.isfinite(oa).all()
        assert torch.equal(oa, ob)  # the combine order is by stage, not by node order


def test_stage_order_uncond_rewrites_feed_the_direction():
    """TCFG and CFG-Zero* rewrite U before APG sees C − U (stage 1 before stage 2)."""
    from guidance_kit.guiders.methods.apg import apg_direction
    from guidance_kit.guiders.methods.cfg_zero_star import optimized_scale, scale_uncond_velocity
    from guidance_kit.guiders.methods.tcfg import tangential_damping

    x, c, u = random_triplet()
    apg = APG(eta=0.3, norm_threshold=0.0, momentum=0.0)
    plan = plan_with("tcfg").with_method(CFGZeroStar(True, 0)).with_method(apg)
    got = combine(plan, step_inputs(x, c, u, cond_scale=5.0, sigma=1.0), GuidanceState())[0]
    u1 = tangential_damping(x, c, u)
    u2 = scale_uncond_velocity(x, u1, optimized_scale(x, c, u1, 1.0))
    d, _ = apg_direction(c - u2, c, 0.3, 0.0, 0.0, None)
    assert torch.allclose(got, c + 4.0 * d, atol=1e-4)


# --- extra branches (stage 3) ---------------------------------------------------------------------
def perturbed(c):
    return c * 0.8 + 0.1


def test_extra_term_adds_scaled_direction_and_scale_zero_is_identity():
    """Invariant 1: a term at scale 0 leaves the result exactly as the plan without it."""
    x, c, u = random_triplet()
    branch = Branch("test-branch", source="cond")
    with_zero = plan_with("apg", extra=[ExtraGuidance(branch, scale=0.0)])
    without = plan_with("apg")
    b = {"test-branch": perturbed(c)}
    for o1, o2 in zip(run_steps(with_zero, x, c, u, branches=b), run_steps(without, x, c, u)):
        assert torch.equal(o1, o2)
    assert needs(with_zero, position_at(1.0, 6), 1.0).branches == ()  # and it costs no evaluation
    term = ExtraGuidance(branch, scale=2.5)
    got = combine(GuidancePlan().with_extra(term), step_inputs(x, c, u, cond_scale=4.0, branches=b),
                  GuidanceState())[0]
    assert torch.allclose(got, cfg_reference(c, u, 4.0) + 2.5 * (c - perturbed(c)), atol=1e-5)


def test_extra_term_window_and_schedule_skip_its_branch():
    branch = Branch("b")
    term = ExtraGuidance(branch, scale=3.0, schedule=Schedule(window=Window(start=0.0, end=0.4)))
    plan = GuidancePlan().with_extra(term)
    assert needs(plan, position_at(1.0, 11), 5.0).branches == (branch,)
    assert needs(plan, position_at(6.0, 11), 5.0).branches == ()
    with pytest.raises(PlanError):
        plan.with_extra(term)  # same branch twice


def test_missing_branch_prediction_is_an_error():
    plan = GuidancePlan().with_extra(ExtraGuidance(Branch("b"), scale=1.0, label="Test"))
    x, c, u = random_triplet()
    with pytest.raises(KeyError, match="Test"):
        combine(plan, step_inputs(x, c, u), GuidanceState())


def test_zero_init_step_needs_no_model_call():
    plan = plan_with("cfg_zero_star", extra=[ExtraGuidance(Branch("b"), scale=1.0)])
    need = needs(plan, position_at(0.0, 10), 1.0)
    assert not need.cond and not need.uncond and need.branches == ()


# --- dtypes, batches, shapes ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot", list(METHODS))
def test_half_precision_inputs_stay_finite_and_close(dtype, slot):
    """Invariant 12: norms/projections in float32, result in the input dtype."""
    x, c, u = random_triplet((2, 4, 16, 16))
    x, c, u = x * 300, c * 300, u * 300  # squares overflow fp16 (max 65504) if computed in fp16
    plan = plan_with(slot)
    ref = run_steps(plan, x, c, u, cond_scale=7.0)
    low = run_steps(plan, x.to(dtype), c.to(dtype), u.to(dtype), cond_scale=7.0)
    for r, lo in zip(ref, low):
        assert lo.dtype == dtype and torch.isfinite(lo).all()
        assert torch.allclose(lo.float(), r, rtol=0.05, atol=0.05 * r.abs().max().item())


@pytest.mark.parametrize("slot", list(METHODS))
def test_batch_of_four_is_per_sample(slot):
    x, c, u = random_triplet((4, 4, 16, 16))
    plan = plan_with(slot)
    batched = run_steps(plan, x, c, u, cond_scale=6.0)
    for i in range(4):
        alone = run_steps(plan, x[i:i + 1], c[i:i + 1], u[i:i + 1], cond_scale=6.0)
        for b_out, a_out in zip(batched, alone):
            assert torch.allclose(b_out[i:i + 1], a_out, atol=1e-5)


@pytest.mark.parametrize("slot", list(METHODS))
def test_video_latents(slot):
    x, c, u = random_triplet((2, 16, 5, 16, 16))
    for out in run_steps(plan_with(slot), x, c, u, cond_scale=6.0):
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_apg_on_video_reduces_over_all_non_batch_dims():
    """Core APG reduces over (T,H,W) per channel on 5-D latents; the paper's projection is per sample."""
    x, c, u = random_triplet((1, 4, 3, 8, 8))
    plan = GuidancePlan().with_method(APG(eta=0.0, norm_threshold=0.0, momentum=0.0))
    got = combine(plan, step_inputs(x, c, u, cond_scale=5.0), GuidanceState())[0]
    diff = (got - c).flatten()
    assert abs(torch.dot(diff, c.flatten())) < 1e-3 * diff.norm() * c.flatten().norm()


def test_nan_from_the_model_propagates_to_the_engine_check():
    """The pure combine does not hide NaNs; the engine turns them into a clear error (ComfyUI tier)."""
    x, c, u = random_triplet()
    c = c.clone()
    c[0, 0, 0, 0] = float("nan")
    out = combine(plan_with("apg"), step_inputs(x, c, u), GuidanceState())[0]
    assert not torch.isfinite(out).all()


def test_methods_inactive_at_cfg_one():
    plan = plan_with("apg", "tcfg", "cfg_schedule")
    assert set(plan.inactive_at_cfg_one(uncond_evaluated=False)) == {"APG", "TCFG", "cfg_schedule"}
    assert set(plan.inactive_at_cfg_one(uncond_evaluated=True)) == {"APG", "cfg_schedule"}  # CFG++ uses U
    assert plan_with("fdg", "apg").inactive_at_cfg_one(False) == []  # FDG's scales replace cfg
