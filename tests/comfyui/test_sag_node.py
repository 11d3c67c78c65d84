"""SAG on real ComfyUI models (tiny random weights): equal to ComfyUI core's SelfAttentionGuidance on SD1.5, the
degraded rows run as one extra call after the batched one, the output changes; on Flux and SD3 the map comes from the
middle double block and the re-noise follows the flow schedule; other DiT families are refused."""

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


@pytest.mark.parametrize("family", ["wan21"])
def test_other_dit_families_are_refused_with_the_reason(family):
    with pytest.raises(Exception, match="SAG: .* is a DiT without the joint double blocks.*Flux and SD3"):
        sag(tiny_model(family))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_output_changes_with_one_batched_degraded_call(family):
    base = tiny_model(family)
    model, counter = counted(sag(base, scale=1.0))
    result = ksample(model, family, CFG, STEPS, batch=2)
    assert counter.batches == [4, 2] * STEPS
    assert rel_diff(result, ksample(base, family, CFG, STEPS, batch=2)) > 1e-3


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_stacks_with_pag(family):
    base = tiny_model(family)
    both = out(P.PAGNode.execute(sag(base, scale=1.0), 1.0, "auto", "constant", 0.0, 1.0))
    model, counter = counted(both)
    result = ksample(model, family, CFG, STEPS)
    assert counter.batches == [3, 1] * STEPS
    assert rel_diff(result, ksample(sag(base, scale=1.0), family, CFG, STEPS)) > 1e-3


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_acts_at_cfg_one(family):
    base = tiny_model(family)
    assert rel_diff(ksample(sag(base, scale=1.0), family, 1.0, STEPS), ksample(base, family, 1.0, STEPS)) > 1e-3


def test_flow_degraded_input_is_the_degraded_x0_renoised_with_the_uncond_noise():
    import torch

    from guidance_kit.nodes.contributors.self_attention_blur import degraded_input

    flux = tiny_model("flux").model
    x0, noise, degraded = (torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    sigma = torch.tensor([0.3, 0.8])
    s = sigma.view(2, 1, 1, 1)
    x = (1 - s) * x0 + s * noise
    expected = (1 - s) * degraded + s * noise
    assert torch.allclose(degraded_input(flux, x, sigma, degraded, x0), expected, atol=1e-6)
    sd15 = tiny_model("sd15").model  # ε-type: x = x0 + σ·ε
    x = x0 + s * noise
    assert torch.allclose(degraded_input(sd15, x, sigma, degraded, x0), degraded + s * noise, atol=1e-6)


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


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_map_covers_the_image_tokens_of_the_uncond_rows(family, monkeypatch):
    import torch

    from guidance_kit.nodes.contributors import self_attention_blur as blur

    seen = []

    original = blur.blur_attended

    def recording(x0, scores, blur_sigma, threshold):
        seen.append((x0.shape, scores.clone()))
        return original(x0, scores, blur_sigma, threshold)

    monkeypatch.setattr(blur, "blur_attended", recording)
    ksample(sag(tiny_model(family), scale=1.0), family, CFG, STEPS, batch=2)
    assert len(seen) == STEPS
    for shape, scores in seen:
        tokens = ((shape[-2] + 1) // 2) * ((shape[-1] + 1) // 2)  # the 2 × 2 patch grid
        assert scores.shape == (shape[0], tokens)
        torch.testing.assert_close(scores.sum(-1), torch.full((shape[0],), float(tokens)))  # image-only softmax
