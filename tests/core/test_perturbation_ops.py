"""Operators of the perturbation methods (PAG, SEG, TPG, S²-Guidance, TSG, ICG) and the shared
layer-selection syntax, against direct references."""

import math

import pytest
import torch

from guidance_kit.guiders import attention_ops as ops
from guidance_kit.guiders.branch_inputs import independent_embedding, perturbed_timesteps
from guidance_kit.guiders.layers import BlockLayout, LayerError, parse_layers, resolve
from guidance_kit.guiders.methods.icg import IndependentCondition
from guidance_kit.guiders.plan import Branch, GuidancePlan, PlanError


def qkv(b=2, h=3, length=12, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=g).to(dtype) for _ in range(3))


# --- PAG -------------------------------------------------------------------------------------------

def test_identity_attention_outputs_the_values():
    q, k, v = qkv()
    assert torch.equal(ops.identity_self_attention(q, k, v), v)


def test_joint_identity_attention_equals_the_masked_reference():
    q, k, v = qkv(length=10)
    image = slice(4, 10)  # text first (Flux, SD3, Qwen-Image)
    allowed = torch.ones(10, 10, dtype=torch.bool)
    allowed[4:, 4:] = torch.eye(6, dtype=torch.bool)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    got = ops.identity_self_attention(q, k, v, image=image)
    assert torch.allclose(got, reference, atol=1e-5)
    # text queries keep their full attention; image→image is the identity
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(got[:, :, :4], full[:, :, :4], atol=1e-6)


def test_joint_identity_attention_image_first_layout():
    q, k, v = qkv(length=9)
    allowed = torch.ones(9, 9, dtype=torch.bool)
    allowed[:5, :5] = torch.eye(5, dtype=torch.bool)  # HunyuanVideo: image tokens first
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(ops.identity_self_attention(q, k, v, image=slice(0, 5)), reference, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_identity_attention_low_precision_is_finite(dtype):
    q, k, v = qkv(length=10, dtype=dtype)
    out = ops.identity_self_attention(q, k, v, image=slice(3, 10))
    assert out.dtype == dtype and torch.isfinite(out).all()


# --- SEG -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma, size", [(10.0, 61), (1.0, 7), (0.5, 3), (2.2, 15), (0.1, 1), (1 / 6, 1), (0.2, 3)])
def test_seg_kernel_size_matches_the_official_formula(sigma, size):
    six = math.ceil(6 * sigma)
    assert ops.gaussian_kernel_size(sigma) == six + 1 - six % 2 == size


def test_seg_zero_blur_is_the_unperturbed_attention():
    q, k, v = qkv(length=12)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(ops.smoothed_energy_attention(q, k, v, (3, 4), 0.0), plain, atol=1e-6)


def test_seg_infinite_blur_gives_every_query_the_mean_query():
    q, k, v = qkv(length=12)
    out = ops.smoothed_energy_attention(q, k, v, (3, 4), float("inf"))
    mean_q = q.mean(dim=2, keepdim=True).expand_as(q)
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(mean_q, k, v), atol=1e-6)
    assert torch.allclose(out, ops.smoothed_energy_attention(q, k, v, (3, 4), 10000.0), atol=1e-6)
    # every query attends identically
    assert torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-6)


def test_seg_blur_keeps_constant_tokens_and_blurs_per_frame():
    x = torch.ones(1, 2, 2 * 4 * 5, 3)
    assert torch.allclose(ops.blur_grid_tokens(x, (2, 4, 5), 1.5), x, atol=1e-6)
    y = torch.zeros(1, 1, 2 * 9 * 9, 1)
    y[0, 0, 40] = 1.0  # a spike at the centre of frame 0 (kernel 7: the reflect padding never copies it)
    blurred = ops.blur_grid_tokens(y, (2, 9, 9), 1.0)
    assert blurred[0, 0, :81].sum() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 0, 81:].abs().max() == 0  # frames do not mix
    assert 0 < blurred[0, 0, 40] < 1


def test_seg_joint_blurs_only_image_queries():
    q, k, v = qkv(length=4 + 12)
    image = slice(4, 16)
    out = ops.smoothed_energy_attention(q, k, v, (3, 4), 2.0, image=image)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out[:, :, :4], full[:, :, :4], atol=1e-6)
    assert not torch.allclose(out[:, :, 4:], full[:, :, 4:], atol=1e-4)


def test_seg_grid_mismatch_is_an_error():
    q, _, _ = qkv(length=12)
    with pytest.raises(ValueError, match="token grid"):
        ops.blur_grid_tokens(q, (5, 5), 1.0)


# --- TPG / S²-Guidance -----------------------------------------------------------------------------

def test_shuffle_then_inverse_is_identity_and_norm_preserving():
    x = torch.randn(2, 10, 4)
    perm = ops.permutation(10, ops.seeded_generator(3, 1))
    shuffled = ops.shuffle_tokens(x, perm)
    assert torch.allclose(shuffled.norm(), x.norm())
    assert torch.equal(ops.shuffle_tokens(shuffled, ops.inverse_permutation(perm)), x)
    span = ops.shuffle_tokens(x, ops.permutation(6, ops.seeded_generator(1)), span=slice(4, 10))
    assert torch.equal(span[:, :4], x[:, :4])


def test_permutations_are_reproducible_and_fresh_per_step():
    a = ops.permutation(50, ops.seeded_generator(7, 0))
    assert torch.equal(a, ops.permutation(50, ops.seeded_generator(7, 0)))
    assert not torch.equal(a, ops.permutation(50, ops.seeded_generator(7, 1)))


def test_drop_selection_count_and_reproducibility():
    chosen = ops.drop_selection(20, 0.1, ops.seeded_generator(5, 2))
    assert len(chosen) == 2 and len(set(chosen)) == 2 and all(0 <= i < 20 for i in chosen)
    assert chosen == ops.drop_selection(20, 0.1, ops.seeded_generator(5, 2))
    assert ops.drop_selection(20, 0.0, ops.seeded_generator(5, 2)) == []
    steps = {tuple(ops.drop_selection(20, 0.1, ops.seeded_generator(5, s))) for s in range(10)}
    assert len(steps) > 1  # resampled every step


# --- TSG / ICG ---------------------------------------------------------------------------------------

def test_timestep_perturbation_size_zero_is_identity_and_clamped():
    t = torch.tensor([999.0, 500.0, 1.0])
    assert torch.equal(perturbed_timesteps(t, torch.randn(3), 0.0, 0.0, 999.0), t)
    out = perturbed_timesteps(t, torch.tensor([3.0, 0.0, -3.0]), 0.5, 0.0, 999.0)
    assert out.tolist() == [999.0, 500.0, 0.0]
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    spread = perturbed_timesteps(torch.full((20000,), 0.5), noise, 0.01, 0.0, 1.0)
    assert float(spread.std()) == pytest.approx(0.01, rel=0.05)


def test_independent_embedding_matches_statistics_and_carries_no_prompt():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 77, 16, generator=g) * torch.linspace(0.5, 3, 16) + torch.linspace(-2, 2, 16)
    noise = torch.randn(77, 16, generator=ops.seeded_generator(1))
    out = independent_embedding(ref, noise)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.allclose(out.mean(1), ref.mean(1), atol=0.6)
    assert torch.allclose(out.std(1), ref.std(1), rtol=0.3)
    # a different prompt with the same statistics gives the same condition (independent of content)
    shuffled = ref[:, torch.randperm(77, generator=g)]
    assert torch.allclose(independent_embedding(shuffled, noise), out, atol=1e-5)
    assert not torch.allclose(independent_embedding(ref, torch.randn(77, 16, generator=ops.seeded_generator(2))), out)
    half = independent_embedding(ref.half(), noise)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    with pytest.raises(ValueError, match="ICG"):
        independent_embedding(torch.zeros(5), noise)


def test_icg_is_one_slot_in_the_plan():
    icg = IndependentCondition(Branch("ICG", "cond"))
    plan = GuidancePlan().with_method(icg)
    assert plan.get("icg") is icg and not plan.is_empty
    with pytest.raises(PlanError, match="already has ICG"):
        plan.with_method(icg)
    assert "ICG" in plan.inactive_at_cfg_one(uncond_evaluated=False)


# --- layer selection ------------------------------------------------------------------------------

SDXL = BlockLayout("UNet (SD1.5/SDXL)", unet_blocks={"input": {4: 2, 5: 2, 7: 10, 8: 10}, "middle": {0: 10},
                                                      "output": {0: 10, 1: 10, 2: 10, 3: 2, 4: 2, 5: 2}})
FLUX = BlockLayout("Flux", dit_blocks={"double": 19, "single": 38})
SD3 = BlockLayout("SD3/SD3.5", dit_blocks={"double": 24})


def test_layer_selection_examples_resolve():
    assert resolve(parse_layers("middle 0", "PAG"), SDXL, "PAG") == tuple(("middle", 0, t) for t in range(10))
    keys = resolve(parse_layers("input 7.2-9, input 8", "TPG"), SDXL, "TPG")
    assert keys == tuple(sorted([("input", 7, t) for t in range(2, 10)] + [("input", 8, t) for t in range(10)]))
    assert len(resolve(parse_layers("input 4-5, middle 0", "PAG"), SDXL, "PAG")) == 14
    assert resolve(parse_layers("double 7-9, single 0", "SLG"), FLUX, "SLG") == (
        ("double", 7), ("double", 8), ("double", 9), ("single", 0))
    assert len(resolve(parse_layers("double all; single all", "S2"), FLUX, "S2")) == 57
    assert resolve(parse_layers("blocks 12", "PAG"), SD3, "PAG") == (("double", 12),)
    assert parse_layers(" AUTO ", "PAG").auto
    assert resolve(parse_layers("down 7.0, mid 0.0, up 3", "x"), SDXL, "x")[0] == ("input", 7, 0)


@pytest.mark.parametrize("text, layout, message", [
    ("", SDXL, "empty"),
    ("sideways 3", SDXL, "unknown block group"),
    ("middle", SDXL, "needs block numbers"),
    ("double 9-7", FLUX, "backwards"),
    ("double 3.1", FLUX, "only for UNet"),
    ("double x", FLUX, "cannot read"),
    ("double 19", FLUX, "0–18"),
    ("single 2", SD3, "do not exist on SD3"),
    ("double 0", SDXL, "do not exist on UNet"),
    ("input 6", SDXL, "no transformer layers"),
    ("input 4.2", SDXL, "out of range"),
])
def test_bad_layer_selections_name_the_node_and_the_fix(text, layout, message):
    with pytest.raises(LayerError, match=message) as info:
        resolve(parse_layers(text, "PAG"), layout, "PAG")
    assert str(info.value).startswith("PAG:")
