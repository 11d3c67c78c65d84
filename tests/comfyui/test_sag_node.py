"""SAG on real ComfyUI models (tiny random weights): equal to ComfyUI core's SelfAttentionGuidance on SD1.5, the
degraded rows run as one extra call after the batched one, the output changes, DiT families are refused."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
from comfy_extras.nodes_sag import SelfAttentionGuidance

from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes import sag as S
from tests.comfyui.harness import counted, ksample, out, rel_diff, tiny_model

CFG = 4.0
STEPS = 3


def sag(model, scale=0.5, blur_sigma=2.0):
    return out(S.SAGNode.execute(model, scale, blur_sigma, "constant", 0.0, 1.0))


@pytest.mark.parametrize("batch", [1, 2])
def test_equals_core_sag_on_sd15(batch):
    base = tiny_model("sd15")
    core = out(SelfAttentionGuidance.execute(base, 0.5, 2.0))
    ours = ksample(sag(base), "sd15", CFG, STEPS, batch=batch)
    reference = ksample(core, "sd15", CFG, STEPS, batch=batch)
    assert rel_diff(ours, ksample(base, "sd15", CFG, STEPS, batch=batch)) > 1e-3
    assert rel_diff(ours, reference) <= 1e-4


def test_degraded_rows_are_one_call_after_the_batched_one():
    base = tiny_model("sd15")
    model, counter = counted(sag(base))
    ksample(model, "sd15", CFG, STEPS, batch=2)
    assert counter.batches == [4, 2] * STEPS  # cond + uncond of both samples, then both samples' degraded uncond


def test_scale_zero_is_plain_cfg_without_the_extra_call():
    base = tiny_model("sd15")
    model, counter = counted(sag(base, scale=0.0))
    assert rel_diff(ksample(model, "sd15", CFG, STEPS), ksample(base, "sd15", CFG, STEPS)) < 1e-6
    assert counter.batches == [2] * STEPS


def test_stacks_with_pag():
    base = tiny_model("sd15")
    both = out(P.PAGNode.execute(sag(base), 1.0, "auto", "constant", 0.0, 1.0))
    model, counter = counted(both)
    result = ksample(model, "sd15", CFG, STEPS)
    assert counter.batches == [3, 1] * STEPS
    assert rel_diff(result, ksample(sag(base), "sd15", CFG, STEPS)) > 1e-3


@pytest.mark.parametrize("family", ["flux", "sd3", "wan21"])
def test_dit_families_are_refused_with_the_reason(family):
    with pytest.raises(Exception, match="SAG: .* is a DiT.*UNet"):
        sag(tiny_model(family))


def test_acts_at_cfg_one_as_core_does():
    base = tiny_model("sd15")
    result = ksample(sag(base), "sd15", 1.0, STEPS)
    assert rel_diff(result, ksample(base, "sd15", 1.0, STEPS)) > 1e-3


def test_a_later_node_replacing_the_middle_attention_is_named():
    from comfy.ldm.modules.attention import optimized_attention

    model = sag(tiny_model("sd15"))
    model.set_model_attn1_replace(lambda q, k, v, o: optimized_attention(q, k, v, o["n_heads"]), "middle", 0, 0)
    with pytest.raises(Exception, match="SAG: no self-attention map was recorded.*Put SAG after it"):
        ksample(model, "sd15", CFG, STEPS)
