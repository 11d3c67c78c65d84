"""ERG on real ComfyUI models (tiny random weights): the weak branch (self-attention at a higher temperature)
changes the output inside the one batched call per step, equals a separate-forward evaluation of the same
branch, is exactly CFG at temperature 1, and refuses a temperature below 1."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.samplers
import pytest
import torch

from guidance_kit.nodes import attention_methods as A
from tests.comfyui.harness import counted, ksample, out, rel_diff, tiny_model

CFG = 4.0
STEPS = 4


def erg(model, scale=2.0, temperature=2.0, layers="auto"):
    return out(A.ERGNode.execute(model, scale, temperature, layers, "constant", 0.0, 1.0))


def separate_forward(model):
    """Displace our calc-cond-batch slot: the engine then evaluates the ERG branch in a separate forward."""
    m = model.clone()
    m.set_model_sampler_calc_cond_batch_function(
        lambda args: comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                    args["model_options"]))
    return m


@pytest.mark.parametrize("family", ["sd15", "flux", "sd3", "wan21"])
def test_erg_changes_the_output_in_one_batched_call_per_step(family):
    base = tiny_model(family)
    plain = ksample(base, family, CFG, STEPS)
    model, counter = counted(erg(base, temperature=8.0))
    guided = ksample(model, family, CFG, STEPS)
    assert torch.isfinite(guided).all()
    assert rel_diff(guided, plain) > 1e-3
    assert counter.batches == [3] * STEPS


@pytest.mark.parametrize("family", ["sd15", "flux", "wan21"])
def test_batched_branch_equals_a_separate_forward(family):
    model = erg(tiny_model(family), temperature=4.0)
    batched, counter = counted(model)
    together = ksample(batched, family, CFG, STEPS)
    apart, apart_counter = counted(separate_forward(model))
    separate = ksample(apart, family, CFG, STEPS)
    assert counter.calls == STEPS and apart_counter.calls == 2 * STEPS
    assert rel_diff(together, separate) <= 1e-4


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_temperature_one_is_plain_cfg(family):
    base = tiny_model(family)
    assert rel_diff(ksample(erg(base, temperature=1.0), family, CFG, STEPS), ksample(base, family, CFG, STEPS)) < 1e-5


def test_acts_at_cfg_one_and_rejects_a_temperature_below_one():
    base = tiny_model("sd15")
    assert rel_diff(ksample(erg(base, temperature=8.0), "sd15", 1.0, STEPS), ksample(base, "sd15", 1.0, STEPS)) > 1e-3
    with pytest.raises(ValueError, match="ERG: temperature must be at least 1"):
        erg(base, temperature=0.5)
