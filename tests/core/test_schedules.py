"""Schedules, windows and sampling progress (invariant 7 and the schedule paper's definitions)."""

import math

import pytest
import torch

from guidance_kit.guiders.combine import needs
from guidance_kit.guiders.methods.cfg_schedule import CFGSchedule
from guidance_kit.guiders.plan import GuidancePlan
from guidance_kit.guiders.progress import (
    flow_percent_to_sigma,
    log_linear_percent_to_sigma,
    percent_of_sigma,
    sigma_key,
    step_position,
)
from guidance_kit.guiders.schedules import (
    SHAPES,
    Schedule,
    ScheduleError,
    Window,
    beta_pdf,
    beta_peak,
    parse_step_values,
)

from .gmm import flow_sigmas, karras_sigmas
from .helpers import position_at, random_triplet, step_inputs


def multipliers(schedule: Schedule, n: int, sigma: float = 1.0) -> list[float]:
    """f at progress i/(n−1), i = 0 … n−1."""
    return [schedule.multiplier(i / (n - 1), sigma) for i in range(n)]


def test_percent_inverts_percent_to_sigma_for_every_convention():
    for convention in (log_linear_percent_to_sigma(0.03, 14.6), flow_percent_to_sigma(1.0), flow_percent_to_sigma(3.0),
                       flow_percent_to_sigma(0.2)):
        for p in (0.0001, 0.1, 0.37, 0.5, 0.93, 0.9999):
            assert percent_of_sigma(convention(p), convention) == pytest.approx(p, abs=1e-6)
        assert percent_of_sigma(convention(0.0) * 2, convention) == 0.0  # at or above σ_max
        assert percent_of_sigma(0.0, convention) == 1.0


def test_progress_is_the_percent_of_sigma_and_the_step_is_per_call():
    convention = flow_percent_to_sigma(3.0)
    sigmas = flow_sigmas(20)  # t linear in the step: percent = i/20
    for i in range(20):
        pos = step_position(sigmas, sigmas[i], convention)
        assert pos.step == i and pos.step_index == i and pos.n_steps == 20
        assert pos.progress == pytest.approx(i / 20, abs=1e-6)
        assert pos.from_noise


def test_a_split_run_has_the_same_progress_as_one_call():
    """KSamplerAdvanced 0–10 then 10–20 (or SplitSigmas): the second call's sigmas are the tail of the first's."""
    for convention, sigmas in ((log_linear_percent_to_sigma(0.03, 14.6), karras_sigmas(20)),
                               (flow_percent_to_sigma(3.0), flow_sigmas(20))):
        head, tail = sigmas[:11], sigmas[10:]
        for i in range(20):
            whole = step_position(sigmas, sigmas[i], convention)
            part = step_position(head if i < 10 else tail, sigmas[i], convention)
            assert part.progress == whole.progress
            assert part.step == (i if i < 10 else i - 10)
        assert step_position(head, head[0], convention).from_noise
        assert not step_position(tail, tail[0], convention).from_noise  # a second pass: no zero-init there


def test_progress_between_points_and_outside():
    convention = log_linear_percent_to_sigma(1.0, 8.0)
    sigmas = [8.0, 4.0, 2.0, 0.0]
    assert step_position(sigmas, 6.0, convention).step == pytest.approx(0.5)
    assert step_position(sigmas, 6.0, convention).step_index == 0
    assert step_position(sigmas, 20.0, convention).step == 0  # churn can raise sigma above the first point
    assert step_position(sigmas, 20.0, convention).progress == 0.0
    assert step_position(sigmas, 1.0, convention).step_index == 2  # between the last point and 0
    assert step_position(sigmas, 1.0, convention).progress == pytest.approx(1.0, abs=1e-6)
    assert step_position(sigmas, 0.5, convention).progress == pytest.approx(1.0, abs=1e-6)


def test_sigma_key_is_the_same_for_the_same_sigma_only():
    assert sigma_key(0.5) == sigma_key(torch.tensor(0.5).item())
    assert len({sigma_key(s) for s in karras_sigmas(30)}) == 31


@pytest.mark.parametrize("shape", [s for s in SHAPES if s not in ("constant", "step_list")])
def test_shapes_have_mean_one_over_progress(shape):
    sched = Schedule(shape=shape, power=3.0)
    n = 20001  # trapezoid rule on a fine grid of progress
    values = multipliers(sched, n)
    mean = (sum(values) - 0.5 * (values[0] + values[-1])) / (n - 1)
    assert mean == pytest.approx(1.0, abs=1e-6)


def test_linear_and_cosine_are_the_paper_formulas():
    n = 11
    lin = multipliers(Schedule(shape="linear_increasing"), n)
    cos = multipliers(Schedule(shape="cosine_increasing"), n)
    power = multipliers(Schedule(shape="power_increasing", power=2.0), n)
    for i in range(n):
        u = i / (n - 1)
        assert lin[i] == pytest.approx(2 * u)
        assert cos[i] == pytest.approx(1 - math.cos(math.pi * u))
        assert power[i] == pytest.approx(3 * u ** 2)


@pytest.mark.parametrize("shape", ["linear", "cosine", "power"])
def test_increasing_is_along_the_sampling_direction(shape):
    inc = multipliers(Schedule(shape=f"{shape}_increasing"), 15)
    dec = multipliers(Schedule(shape=f"{shape}_decreasing"), 15)
    assert all(b >= a for a, b in zip(inc, inc[1:]))  # small guidance at high noise (first steps)
    assert inc[0] < inc[-1]
    assert all(b <= a for a, b in zip(dec, dec[1:]))
    assert inc == pytest.approx(dec[::-1])


def test_step_list_spread_over_progress_and_interpolated():
    sched = Schedule(shape="step_list", step_values=(1.0, 0.5, 0.0))
    assert multipliers(sched, 3) == [1.0, 0.5, 0.0]
    assert sched.multiplier(0.25, 1.0) == pytest.approx(0.75)
    assert Schedule(shape="step_list", step_values=(0.3,)).multiplier(0.9, 1.0) == 0.3


def test_window_progress_and_sigma_interval():
    w = Window(start=0.2, end=0.6, sigma_low=0.28, sigma_high=5.42)
    assert w.contains(0.4, 1.0)
    assert not w.contains(0.1, 1.0) and not w.contains(0.7, 1.0)
    assert not w.contains(0.4, 6.0) and not w.contains(0.4, 0.28)  # (low, high]
    assert w.contains(0.4, 5.42)


@pytest.mark.parametrize("bad", [Window(start=0.7, end=0.2), Window(sigma_low=3.0, sigma_high=1.0),
                                 Window(start=-0.1), Window(end=1.5), Window(sigma_low=-1.0)])
def test_empty_or_invalid_windows_are_errors(bad):
    with pytest.raises(ScheduleError):
        bad.validate("CFG Schedule")


def test_unreachable_sigma_window_names_the_fix():
    # an SDXL interval on a flow model's sigmas (all ≤ 1) never acts
    w = Window(sigma_low=2.0, sigma_high=5.42)
    flow, eps = flow_percent_to_sigma(3.0), log_linear_percent_to_sigma(0.03, 14.6)
    sigmas = flow_sigmas(20)
    with pytest.raises(ScheduleError, match="Flow models"):
        w.check_reachable("CFG Schedule", sigmas, [percent_of_sigma(s, flow) for s in sigmas])
    sigmas = karras_sigmas(20)
    w.check_reachable("CFG Schedule", sigmas, [percent_of_sigma(s, eps) for s in sigmas])


@pytest.mark.parametrize("text,expected", [("1, 1, 0.5, 0", (1, 1, 0.5, 0)), ("2\n3;4", (2, 3, 4)), ("7", (7,))])
def test_parse_step_values(text, expected):
    assert parse_step_values(text, "x") == expected


@pytest.mark.parametrize("bad", [Schedule(shape="nope"), Schedule(shape="step_list"),
                                 Schedule(shape="power_increasing", power=0.0),
                                 Schedule(shape="step_list", step_values=(1.0, math.nan))])
def test_bad_schedules(bad):
    with pytest.raises(ScheduleError):
        bad.validate("CFG Schedule")
    with pytest.raises(ScheduleError):
        parse_step_values("1, x", "CFG Schedule")


def test_beta_pdf_matches_closed_forms():
    # Beta(2,2) = 6t(1−t); Beta(2,3) = 12t(1−t)^2; Beta(1,1) = 1
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert beta_pdf(t, 2, 2) == pytest.approx(6 * t * (1 - t))
        assert beta_pdf(t, 2, 3) == pytest.approx(12 * t * (1 - t) ** 2)
        assert beta_pdf(t, 1, 1) == pytest.approx(1.0)
    assert beta_peak(2, 2) == pytest.approx(1.5)
    assert beta_peak(2, 3) == pytest.approx(12 * (1 / 3) * (2 / 3) ** 2)
    with pytest.raises(ScheduleError):
        beta_pdf(0.5, 0.5, 2)


def test_constant_schedule_equals_cfg_and_window_skips_uncond():
    """Invariant 7: constant ≡ CFG; outside the window the result is C and no uncond is asked for."""
    from guidance_kit.guiders.combine import GuidanceState, combine

    x, c, u = random_triplet()
    base = GuidancePlan()
    const = base.with_method(CFGSchedule(Schedule(), "CFG Schedule"))
    inp = step_inputs(x, c, u, cond_scale=6.0)
    ref, _ = combine(base, inp, GuidanceState())
    got, _ = combine(const, inp, GuidanceState())
    assert torch.equal(ref, got)
    assert torch.equal(got, u + (c - u) * 6.0)

    windowed = base.with_method(CFGSchedule(Schedule(window=Window(start=0.5, end=1.0)), "CFG Schedule"))
    early = position_at(2.0, 10)
    assert needs(windowed, early, 1.0).uncond is False
    assert needs(windowed, position_at(7.0, 10), 1.0).uncond is True
    inp_early = step_inputs(x, c, None, cond_scale=6.0, step=2)
    got, handed_uncond = combine(windowed, inp_early, GuidanceState())
    assert torch.equal(got, c) and handed_uncond is None


def test_schedule_scales_the_increment_not_the_full_scale():
    """A zero weight at the first step must give the conditional prediction, never the unconditional one."""
    from guidance_kit.guiders.combine import GuidanceState, combine

    x, c, u = random_triplet()
    plan = GuidancePlan().with_method(CFGSchedule(Schedule(shape="linear_increasing"), "CFG Schedule"))
    first = step_inputs(x, c, u, cond_scale=7.0, step=0, n_steps=11)
    got, _ = combine(plan, first, GuidanceState())
    assert torch.allclose(got, c)
    last = step_inputs(x, c, u, cond_scale=7.0, step=10, n_steps=11)
    got, _ = combine(plan, last, GuidanceState())
    assert torch.allclose(got, u + (c - u) * (1 + 6.0 * 2), atol=1e-5)
