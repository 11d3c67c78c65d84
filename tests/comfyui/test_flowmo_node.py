"""FlowMo on a tiny random-weight WAN through ComfyUI's samplers: it changes the output, lowers the motion loss of
the predicted x0 at the guided step against the same step without it, repeats exactly, a batch of 2 equals two
runs of 1, it runs under torch.inference_mode (ComfyUI's executor), and image models are refused."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.sample
import pytest
import torch

from guidance_kit.guiders.flowmo import motion_loss
from guidance_kit.nodes.flowmo import FlowMoNode
from tests.comfyui.harness import conditioning, ksample, latent, noise_for, out, rel_diff, tiny_model

CFG = 5.0
STEPS = 4


def flowmo(model, learning_rate=0.005, iterations=1, start=0.0, end=0.5):
    return out(FlowMoNode.execute(model, learning_rate, iterations, start, end))


def predicted_x0_losses(model, cfg=CFG, steps=STEPS):
    """The motion loss of the sampler's x0 prediction at every step (the sampler callback's denoised)."""
    losses = []
    comfy.sample.sample(model, noise_for("wan21"), steps, cfg, "euler", "normal", conditioning("wan21", 1),
                        conditioning("wan21", 2), latent("wan21"), disable_pbar=True, seed=0,
                        callback=lambda step, x0, x, total: losses.append(float(motion_loss(x0)[0])))
    return losses


def test_changes_the_output_and_repeats_exactly():
    base = tiny_model("wan21")
    guided = ksample(flowmo(base), "wan21", CFG, STEPS)
    assert rel_diff(guided, ksample(base, "wan21", CFG, STEPS)) > 1e-3
    assert torch.equal(guided, ksample(flowmo(base), "wan21", CFG, STEPS))


@pytest.mark.parametrize("iterations", [1, 3])
def test_lowers_the_motion_loss_of_the_predicted_x0_at_the_guided_step(iterations):
    base = tiny_model("wan21")
    plain = predicted_x0_losses(base)
    guided = predicted_x0_losses(flowmo(base, iterations=iterations))
    print(f"iterations {iterations}: plain {plain}, FlowMo {guided}")
    assert guided[0] < plain[0]  # the first step is the same latent moved by FlowMo; later steps diverge
    assert guided[-1] != plain[-1]


def test_outside_the_window_nothing_changes():
    base = tiny_model("wan21")
    assert torch.equal(ksample(flowmo(base, start=0.9, end=0.95), "wan21", CFG, STEPS),
                       ksample(base, "wan21", CFG, STEPS))
    assert torch.equal(ksample(flowmo(base, iterations=0), "wan21", CFG, STEPS), ksample(base, "wan21", CFG, STEPS))


def test_batch_of_two_equals_two_single_runs():
    model = flowmo(tiny_model("wan21"))
    both = ksample(model, "wan21", CFG, STEPS, batch=2)
    first = ksample(model, "wan21", CFG, STEPS)
    noise = noise_for("wan21", 0, 2)[1:]
    second = comfy.sample.sample(model, noise, STEPS, CFG, "euler", "normal", conditioning("wan21", 1),
                                 conditioning("wan21", 2), latent("wan21"), disable_pbar=True, seed=0)
    # per-sample loss; Adam's first step is lr·sign(gradient), so round-off near a zero gradient may flip an element
    assert rel_diff(both[:1], first) < 1e-4 and rel_diff(both[1:], second) < 1e-4


def test_runs_under_inference_mode_and_at_cfg_one():
    base = tiny_model("wan21")
    with torch.inference_mode():
        guided = ksample(flowmo(base), "wan21", CFG, STEPS)
    assert rel_diff(guided, ksample(flowmo(base), "wan21", CFG, STEPS)) < 1e-5
    assert rel_diff(ksample(flowmo(base), "wan21", 1.0, STEPS), ksample(base, "wan21", 1.0, STEPS)) > 1e-3


def test_image_models_are_refused_and_the_input_model_is_unchanged():
    with pytest.raises(ValueError, match="FlowMo: this model is UNetModel; .*images have no frames"):
        flowmo(tiny_model("sd15"))
    base = tiny_model("wan21")
    flowmo(base)
    assert not base.wrappers.get("predict_noise")


def test_through_the_guidance_guider_stacked_with_apg():
    from guidance_kit.nodes.cfg_methods import APGNode
    from guidance_kit.nodes.guider import GuidanceGuiderNode
    from tests.comfyui.harness import custom_advanced

    base = tiny_model("wan21")
    apg = out(APGNode.execute(base, 0.0, 15.0, 0.0))

    def guided(model):
        guider = out(GuidanceGuiderNode.execute(model, conditioning("wan21", 1), conditioning("wan21", 2), CFG))
        return custom_advanced(guider, "wan21", STEPS)

    with_apg = guided(apg)
    both = guided(flowmo(apg))
    assert rel_diff(both, with_apg) > 1e-3  # FlowMo acts on top of APG
    assert rel_diff(both, guided(flowmo(base))) > 1e-3  # and APG still acts with FlowMo


@pytest.mark.parametrize("sampler", ["uni_pc", "dpmpp_2m", "heun"])
def test_other_samplers_run_and_act(sampler):
    base = tiny_model("wan21")
    guided = ksample(flowmo(base), "wan21", CFG, STEPS, sampler=sampler)
    assert bool(torch.isfinite(guided).all())
    assert rel_diff(guided, ksample(base, "wan21", CFG, STEPS, sampler=sampler)) > 1e-3


def test_a_newer_class_deriving_from_wan_is_refused_not_assumed():
    """Exact family matching: a class that subclasses WanModel (as WanAnimate2Model and CausalWanModel do in newer
    ComfyUI) is not taken for WAN."""
    model = tiny_model("wan21").clone()
    net = model.model.diffusion_model
    derived = type("CausalWanModel", (type(net),), {})
    original = type(net)
    net.__class__ = derived
    try:
        with pytest.raises(Exception, match="FlowMo"):
            flowmo(model)
    finally:
        net.__class__ = original
