"""Every method node on tiny SD1.5-UNet, Flux, SD3 and WAN models, through KSampler and
SamplerCustomAdvanced; invariants checked through the real sampling path; model calls counted."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch

from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes.guider import GuidanceGuiderNode
from tests.comfyui.harness import FAMILIES, cfg_guider, counted, custom_advanced, ksample, out, rel_diff, tiny_model

from .harness import conditioning

CFG = 5.0
STEPS = 6
NO_WINDOW = dict(start_percent=0.0, end_percent=1.0, sigma_high=1000.0, sigma_low=0.0)

# (node, settings, model calls per run of STEPS steps, batch of the calls)
METHOD_CASES = {
    "schedule_cosine": (cm.CFGSchedule, dict(schedule="cosine_increasing", power=2.0, step_values="1", **NO_WINDOW)),
    "schedule_interval": (cm.CFGSchedule, dict(schedule="constant", power=2.0, step_values="1", start_percent=0.0,
                                               end_percent=0.5, sigma_high=1000.0, sigma_low=0.0)),
    "schedule_steps": (cm.CFGSchedule, dict(schedule="step_list", power=2.0, step_values="1, 2, 0.5", **NO_WINDOW)),
    "beta_cfg": (cm.BetaCFGNode, dict(a=2.0, b=3.0, gamma=1.0, normalize_peak=False)),
    "apg": (cm.APGNode, dict(eta=0.0, norm_threshold=15.0, momentum=-0.5)),
    "tcfg": (cm.TCFGNode, dict()),
    "cfg_zero_star": (cm.CFGZeroStarNode, dict(optimized_scale=True, zero_init_steps=1)),
    "fdg": (cm.FDGNode, dict(scales="8, 3")),
    "rescale": (cm.RescaleNode, dict(multiplier=0.7)),
}


def patched(model, case):
    node, kwargs = METHOD_CASES[case]
    return out(node.execute(model, **kwargs))


@pytest.fixture(scope="module")
def plain_results():
    return {f: ksample(tiny_model(f), f, CFG, STEPS) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_method_changes_the_output_with_one_batched_call_per_step(family, case, plain_results):
    model, counter = counted(patched(tiny_model(family), case))
    result = ksample(model, family, CFG, STEPS)
    assert torch.isfinite(result).all()
    assert rel_diff(result, plain_results[family]) > 1e-3, "the method had no effect"
    expected_calls = STEPS - (1 if case == "cfg_zero_star" else 0)  # zero-init skips the first step's call
    assert counter.calls == expected_calls
    if case == "schedule_interval":
        # guidance only in the first half: the uncond chunk is dropped afterwards
        assert counter.batches == [2, 2, 2, 1, 1, 1]
    elif case == "schedule_cosine":
        assert counter.batches[0] == 1 and set(counter.batches[1:]) == {2}  # f(0) = 0: cond only
    else:
        assert set(counter.batches) == {2}
    guider = out(GuidanceGuiderNode.execute(model, conditioning(family, 1), conditioning(family, 2), CFG))
    assert torch.equal(custom_advanced(guider, family, STEPS), result)  # SamplerCustomAdvanced path


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_guider_matches_ksampler_for_a_stack(family):
    stack = patched(patched(patched(tiny_model(family), "tcfg"), "apg"), "schedule_cosine")
    via_ksampler = ksample(stack, family, CFG, STEPS)
    guider = out(GuidanceGuiderNode.execute(stack, conditioning(family, 1), conditioning(family, 2), CFG))
    via_guider = custom_advanced(guider, family, STEPS)
    assert torch.equal(via_guider, via_ksampler)
    via_core_guider = custom_advanced(cfg_guider(stack, family, CFG), family, STEPS)
    assert torch.equal(via_core_guider, via_ksampler)


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_guider_without_methods_is_plain_cfg(family):
    base = tiny_model(family)
    guider = out(GuidanceGuiderNode.execute(base, conditioning(family, 1), conditioning(family, 2), CFG))
    assert torch.equal(custom_advanced(guider, family, STEPS), custom_advanced(cfg_guider(base, family, CFG), family,
                                                                              STEPS))


@pytest.mark.parametrize("family", FAMILIES)
def test_invariants_through_comfyui(family, plain_results):
    """Invariants 2, 3, 6 on the real sampling path (constant schedule, APG η=1, FDG equal scales)."""
    base = tiny_model(family)
    plain = plain_results[family]
    constant = out(cm.CFGSchedule.execute(base, schedule="constant", power=2.0, step_values="1", **NO_WINDOW))
    assert rel_diff(ksample(constant, family, CFG, STEPS), plain) <= 1e-6
    apg = out(cm.APGNode.execute(base, eta=1.0, norm_threshold=0.0, momentum=0.0))
    assert rel_diff(ksample(apg, family, CFG, STEPS), plain) <= 1e-5
    fdg = out(cm.FDGNode.execute(base, scales=f"{CFG}, {CFG}"))
    assert rel_diff(ksample(fdg, family, 1.0, STEPS), plain) <= 1e-4  # FDG's scales replace cfg, even at 1


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_of_every_method(family):
    model = tiny_model(family)
    for case in ("schedule_cosine", "beta_cfg", "apg", "tcfg", "cfg_zero_star", "fdg", "rescale"):
        model = patched(model, case)
    counted_model, counter = counted(model)
    for path in ("ksampler", "guider"):
        if path == "ksampler":
            result = ksample(counted_model, family, CFG, STEPS)
        else:
            guider = out(GuidanceGuiderNode.execute(counted_model, conditioning(family, 1), conditioning(family, 2),
                                                    CFG))
            result = custom_advanced(guider, family, STEPS)
        assert torch.isfinite(result).all()
    assert counter.calls == 2 * (STEPS - 1)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_batch_of_two_latents_is_per_sample(family):
    model = patched(patched(tiny_model(family), "apg"), "rescale")
    both = ksample(model, family, CFG, STEPS, batch=2, seed=3)
    import comfy.sample

    from tests.comfyui.harness import latent

    full_noise = comfy.sample.prepare_noise(latent(family, 2), 3)
    first = comfy.sample.sample(model, full_noise[:1], STEPS, CFG, "euler", "normal", conditioning(family, 1),
                                conditioning(family, 2), latent(family, 1), disable_pbar=True, seed=3)
    assert torch.allclose(both[:1], first, atol=1e-4, rtol=1e-4)
