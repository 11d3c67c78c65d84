"""Adaptive Guidance / LinearAG in real ComfyUI sampling: stopped branches cost no model pass (counted
per forward on tiny models), a stopped uncond gives the conditional-only result, PAG's branch stops
too, the Guidance Guider path agrees with KSampler, and every run logs its model passes vs CFG."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import logging

import pytest
import torch

from guidance_kit.guiders.progress import percent_of_sigma
from guidance_kit.nodes import adaptive as ag
from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import guider as gd
from guidance_kit.nodes import perturbation as P
from tests.comfyui.harness import (
    conditioning,
    counted,
    custom_advanced,
    ksample,
    out,
    rel_diff,
    sigmas_for,
    tiny_model,
)

CFG = 4.0
STEPS = 6
FAMILIES = ("sd15", "flux", "sd3", "wan21")


def adaptive(model, threshold=0.99, scope="uncond and branches", linear=False, calibration=3, refresh=2,
             start=0.0):
    return out(ag.AdaptiveGuidanceNode.execute(model, threshold, start, scope, linear, calibration, refresh))


def pag(model, scale=2.0):
    return out(P.PAGNode.execute(model, scale, "auto", "constant", 0.0, 1.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_above_one_is_cfg_exactly_at_cfg_cost(family):
    base = tiny_model(family)
    plain = ksample(base, family, CFG, STEPS)
    model, counter = counted(adaptive(base, threshold=1.01))
    assert torch.equal(ksample(model, family, CFG, STEPS), plain)
    assert counter.batches == [2] * STEPS


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_minus_one_never_runs_the_uncond(family):
    base = tiny_model(family)
    cond_only = ksample(base, family, 1.0, STEPS)
    model, counter = counted(adaptive(base, threshold=-1.0))
    guided = ksample(model, family, CFG, STEPS)
    assert counter.batches == [1] * STEPS
    assert rel_diff(guided, cond_only) <= 1e-5


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_converged_predictions_switch_the_uncond_off_after_the_first_check(family):
    """Negative = positive prompt: cos(ε_c, ε_u) = 1 at the first evaluation past start_percent."""
    base = tiny_model(family)
    same = conditioning(family, 1)
    model, counter = counted(adaptive(base, threshold=0.999, start=0.4))
    ksample(model, family, CFG, STEPS, positive=same, negative=same)
    # the uncond runs until the first evaluation at progress ≥ 0.4 (ComfyUI's percent of σ), is checked there
    # and stops
    sampling = base.get_model_object("model_sampling")
    percents = [percent_of_sigma(s, sampling.percent_to_sigma) for s in sigmas_for(base, STEPS).tolist()]
    first = next(i for i, p in enumerate(percents) if p >= 0.4 - 1e-6)
    assert 0 < first < STEPS - 1
    assert counter.batches == [2] * (first + 1) + [1] * (STEPS - first - 1)


def test_pag_branch_stops_too():
    family = "sd15"
    base = tiny_model(family)
    both, counter = counted(adaptive(pag(base), threshold=-1.0))
    assert rel_diff(ksample(both, family, CFG, STEPS), ksample(base, family, 1.0, STEPS)) <= 1e-5
    assert counter.batches == [1] * STEPS
    only_branches, counter = counted(adaptive(pag(base), threshold=-1.0, scope="branches only"))
    ksample(only_branches, family, CFG, STEPS)
    assert counter.batches == [2] * STEPS
    same = conditioning(family, 1)
    uncond_stops, counter = counted(adaptive(pag(base), threshold=0.999999, start=0.0))
    ksample(uncond_stops, family, CFG, STEPS, positive=same, negative=same)
    assert counter.batches == [3] + [2] * (STEPS - 1)  # the uncond converged, PAG's branch did not


def test_linear_ag_estimates_every_other_uncond_after_calibration():
    family = "flux"
    base = tiny_model(family)
    model, counter = counted(adaptive(base, threshold=1.01, linear=True, calibration=2, refresh=2))
    guided = ksample(model, family, CFG, STEPS)
    assert counter.batches == [2, 2, 1, 2, 1, 2]
    assert torch.isfinite(guided).all()
    assert rel_diff(guided, ksample(base, family, CFG, STEPS)) > 0  # estimates are not exact


def test_guidance_guider_gives_the_ksampler_result():
    family = "flux"
    model = adaptive(out(cm.APGNode.execute(tiny_model(family), 0.0, 15.0, -0.5)), threshold=-1.0)
    via_ksampler = ksample(model, family, CFG, STEPS)
    guider = out(gd.GuidanceGuiderNode.execute(model, conditioning(family, 1), conditioning(family, 2), CFG))
    assert rel_diff(custom_advanced(guider, family, STEPS), via_ksampler) <= 1e-5


def test_every_run_logs_model_passes_against_plain_cfg(caplog):
    family = "sd15"
    model = adaptive(pag(tiny_model(family)), threshold=-1.0, scope="branches only")
    with caplog.at_level(logging.INFO, logger="guidance_kit"):
        ksample(model, family, CFG, STEPS)
    lines = [r.getMessage() for r in caplog.records if "model passes" in r.getMessage()]
    assert len(lines) == 1
    assert f"{STEPS} model evaluations, {2 * STEPS} model passes" in lines[0]
    assert f"plain CFG would make {2 * STEPS} (+0%)" in lines[0]
    assert "PAG" not in lines[0] or "off after evaluation 1" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="guidance_kit"):
        ksample(adaptive(tiny_model(family), threshold=-1.0), family, CFG, STEPS)
    line = next(r.getMessage() for r in caplog.records if "model passes" in r.getMessage())
    assert f"{STEPS} model passes" in line and "(-50%)" in line


def test_node_rejects_bad_settings_with_its_name():
    message = ag.AdaptiveGuidanceNode.validate_inputs(threshold=0.99, scope="branches only", linear_ag=True)
    assert isinstance(message, str) and "Adaptive Guidance" in message
    with pytest.raises(ValueError, match="Adaptive Guidance"):
        ag.AdaptiveGuidanceNode.execute(tiny_model("sd15"), 0.99, 0.5, "branches only", True, 3, 2)


def node_defaults() -> dict:
    schema = ag.AdaptiveGuidanceNode.GET_SCHEMA()
    return {i.id: i.default for i in schema.inputs if i.id != "model"}


def test_defaults_are_linear_ag_alone_at_cfg_quality():
    """The node's defaults: no switch, LinearAG with 3 calibration evaluations, then every other uncond estimated."""
    defaults = node_defaults()
    assert defaults["threshold"] > 1 and defaults["linear_ag"] is True
    family = "sd15"
    base = tiny_model(family)
    model, counter = counted(out(ag.AdaptiveGuidanceNode.execute(base, **defaults)))
    guided = ksample(model, family, CFG, STEPS)
    assert counter.batches == [2, 2, 2, 1, 2, 1]
    assert 0 < rel_diff(guided, ksample(base, family, CFG, STEPS)) < 0.05


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_each_sample_switches_on_its_own(family):
    """A batch of two whose first sample's negative equals its prompt (converged from the start) and whose second is
    not: the first sample switches at once, the second never; each equals its own single run, and the uncond pass
    (one chunk for the batch) keeps running for the second."""
    import comfy.sample

    base = tiny_model(family)
    a, other = conditioning(family, 1), conditioning(family, 2)
    b = [[other[0][0], a[0][1]]]  # another prompt, the same pooled vector / guidance (Flux) as a
    positive = [[torch.cat([a[0][0], a[0][0]]), a[0][1]]]
    negative = [[torch.cat([a[0][0], b[0][0]]), a[0][1]]]
    lat = harness.latent(family, 2)
    noise = comfy.sample.prepare_noise(lat, 3)
    model, counter = counted(adaptive(base, threshold=0.999999, start=0.0))

    def run(pos, neg, rows):
        return comfy.sample.sample(model, noise[rows], STEPS, CFG, "euler", "normal", pos, neg, lat[rows],
                                   disable_pbar=True, seed=3)

    batch = run(positive, negative, slice(0, 2))
    assert counter.batches == [4] * STEPS  # cond and uncond chunks of 2 rows: the second sample still needs it
    first, second = run(a, a, slice(0, 1)), run(a, b, slice(1, 2))
    assert rel_diff(batch[:1], first) <= 1e-5 and rel_diff(batch[1:], second) <= 1e-5
    plain_second = comfy.sample.sample(base, noise[1:], STEPS, CFG, "euler", "normal", a, b, lat[1:],
                                       disable_pbar=True, seed=3)
    assert rel_diff(second, plain_second) <= 1e-5  # never converged: plain CFG


def test_the_run_log_counts_samples_that_switched(caplog):
    import comfy.sample

    family = "sd15"
    base = tiny_model(family)
    a, other = conditioning(family, 1), conditioning(family, 2)
    positive = [[torch.cat([a[0][0], a[0][0]]), a[0][1]]]
    negative = [[torch.cat([a[0][0], other[0][0]]), a[0][1]]]
    lat = harness.latent(family, 2)
    with caplog.at_level(logging.INFO, logger="guidance_kit"):
        comfy.sample.sample(adaptive(base, threshold=0.999999, start=0.0), comfy.sample.prepare_noise(lat, 3), STEPS,
                            CFG, "euler", "normal", positive, negative, lat, disable_pbar=True, seed=3)
    line = next(r.getMessage() for r in caplog.records if "model passes" in r.getMessage())
    assert "uncond off for 1 of 2 samples" in line
