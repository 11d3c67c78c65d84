"""The inputs that say how β-CFG, FDG and APG use the sampler's cfg and the latent, on tiny real models:
β-CFG's normalisation, FDG's scale_mode (and its log line when cfg does not act), APG's per-band mode with FDG."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import logging

import comfy.sample
import pytest
import torch

from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes.runtime.engine import plan_of
from tests.comfyui.harness import conditioning, ksample, out, rel_diff, tiny_model

STEPS = 4
RMS, L2 = list(cm.BETA_NORMALIZATIONS)
ABSOLUTE, RELATIVE = list(cm.FDG_SCALE_MODES)
PROJECTION, FULL = list(cm.APG_FDG_MODES)


def beta(model, normalization=RMS):
    return out(cm.BetaCFGNode.execute(model, 2.0, 2.0, 1.0, False, normalization))


def fdg(model, scales="6, 3", mode=ABSOLUTE):
    return out(cm.FDGNode.execute(model, scales, mode))


def apg(model, mode=PROJECTION):
    return out(cm.APGNode.execute(model, 0.0, 2.0, -0.5, mode))


def test_beta_cfg_defaults_to_rms_and_keeps_the_papers_l2():
    schema = {i.id: i for i in cm.BetaCFGNode.GET_SCHEMA().inputs}
    assert schema["normalization"].default == RMS
    base = tiny_model("sd15")
    assert plan_of(beta(base)).get("beta_cfg").normalization == "rms"
    assert plan_of(beta(base, L2)).get("beta_cfg").normalization == "l2"
    assert isinstance(cm.BetaCFGNode.validate_inputs(normalization="Linf"), str)


class GuidanceRMS:
    """Post-cfg function: per-element RMS of (U − D̂)/σ at each evaluation."""

    def __init__(self):
        self.values = []

    def __call__(self, args):
        sigma = args["sigma"].reshape(-1, 1, 1, 1)
        self.values.append(float(((args["uncond_denoised"] - args["denoised"]) / sigma).square().mean().sqrt()))
        return args["denoised"]


@pytest.mark.parametrize("family,channels", [("sd15", 4), ("flux", 16)])
def test_beta_cfg_per_element_strength_does_not_depend_on_the_latent_size(family, channels):
    """The real path (KSampler, eps and flow): with γ = 1 the guidance's per-element RMS is cfg·β(τ)/256 in RMS
    mode at every latent size; the paper's L2 mode gives cfg·β(τ)/√N (half at twice the width and height)."""
    base = tiny_model(family)
    measured = {}
    for normalization in (RMS, L2):
        for size in (16, 32):
            probe = GuidanceRMS()
            model = beta(base, normalization)
            model.set_model_sampler_post_cfg_function(probe, disable_cfg1_optimization=True)
            latent = torch.zeros(1, channels, size, size)
            comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), STEPS, 5.0, "euler", "normal",
                                conditioning(family, 1), conditioning(family, 2), latent, disable_pbar=True)
            measured[normalization, size] = max(probe.values)
    assert measured[RMS, 16] == pytest.approx(measured[RMS, 32], rel=1e-3)
    assert measured[L2, 32] == pytest.approx(measured[L2, 16] / 2, rel=1e-3)


def test_fdg_absolute_scales_ignore_cfg_and_say_so_once(caplog):
    family = "sd15"
    model = fdg(tiny_model(family))
    caplog.set_level(logging.WARNING, logger="guidance_kit")
    at_three = ksample(model, family, 3.0, STEPS)
    assert rel_diff(at_three, ksample(model, family, 7.0, STEPS)) <= 1e-5  # (round-off of ComfyUI's hand-back)
    notes = [r.getMessage() for r in caplog.records if "does not change the guidance" in r.getMessage()]
    assert len(notes) == 2 and "FDG" in notes[0] and "relative to cfg" in notes[0]  # once per run
    caplog.clear()
    ksample(model, family, 6.0, STEPS)  # cfg = the first scale: the usual setup, no note
    assert not [r for r in caplog.records if "does not change the guidance" in r.getMessage()]


def test_fdg_relative_scales_follow_cfg():
    family = "flux"
    base = tiny_model(family)
    relative = fdg(base, "1, 0.5", RELATIVE)
    assert rel_diff(ksample(relative, family, 3.0, STEPS), ksample(relative, family, 7.0, STEPS)) > 1e-3
    # 1 + (cfg − 1)·scale: at cfg 7, "1, 0.5" is the absolute "7, 4"
    assert rel_diff(ksample(relative, family, 7.0, STEPS), ksample(fdg(base, "7, 4"), family, 7.0, STEPS)) <= 1e-5
    # cfg 1 is no guidance in any band, as plain CFG at 1
    assert rel_diff(ksample(relative, family, 1.0, STEPS), ksample(base, family, 1.0, STEPS)) <= 1e-5
    assert isinstance(cm.FDGNode.validate_inputs(scales="6, 3", scale_mode="sometimes"), str)


def test_apg_on_fdg_bands_defaults_to_projection_only():
    family = "sd15"
    base = fdg(tiny_model(family))
    projected = ksample(apg(base), family, 6.0, STEPS)
    no_momentum_no_clip = ksample(out(cm.APGNode.execute(base, 0.0, 0.0, 0.0, FULL)), family, 6.0, STEPS)
    assert rel_diff(projected, no_momentum_no_clip) <= 1e-5  # momentum −0.5 and threshold 2 are not applied
    assert rel_diff(ksample(apg(base, FULL), family, 6.0, STEPS), projected) > 1e-3  # the old rule still exists
    assert plan_of(apg(tiny_model(family))).get("apg").fdg_mode == "projection"


@pytest.mark.parametrize("cfg,warned", [(3.0, True), (60.0, False)])
def test_beta_cfg_says_when_its_guidance_is_weaker_than_cfg_one(cfg, warned, caplog):
    """On the 64-value digits latent the per-element (RMS) guidance at cfg 3 is far below the model's own
    cond − uncond difference: β-CFG then acts like a CFG scale below 1 at mid-run, and says so with the cfg to
    use; at cfg 60 it acts like CFG > 1 and says nothing."""
    from guidance_kit.nodes.digits_nodes import DigitsModelLoader

    loaded = DigitsModelLoader.execute(3)
    model, positive, negative = out(loaded, 0), out(loaded, 1), out(loaded, 2)
    caplog.set_level(logging.WARNING, logger="guidance_kit")
    noise = comfy.sample.prepare_noise(torch.zeros(2, 1, 8, 8), 0)
    comfy.sample.sample(beta(model), noise, 10, cfg, "euler", "normal", positive, negative, torch.zeros(2, 1, 8, 8),
                        disable_pbar=True, seed=0)
    messages = [r.getMessage() for r in caplog.records if "amounts to a CFG scale of only" in r.getMessage()]
    assert bool(messages) == warned, messages
    if warned:
        suggested = float(messages[0].split("use cfg ≈ ")[1].split(" ")[0])
        assert suggested > 10 * cfg  # the digits latent is tiny: far above the usual range
