"""S-CFG's math (``guiders/region_guidance.py``) against the official code's algorithm
(SmilesDZgk/S-CFG ``sd/utils.py:get_mask`` and the rate rule of ``sd/sd.py``), re-implemented here
with explicit N×N self-attention matrices, plus known-answer region/scale cases, the CFG limit,
batches, half precision and bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from guidance_kit.guiders import region_guidance as R
from guidance_kit.guiders.combine import GuidanceState, StepInputs, combine
from guidance_kit.guiders.methods.apg import APG
from guidance_kit.guiders.methods.scfg import SCFG
from guidance_kit.guiders.plan import GuidancePlan, PlanError
from guidance_kit.guiders.progress import StepPosition


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def qk(b=2, heads=3, n=16, d=8, seed=0):
    g = gen(seed)
    return torch.randn(b, heads, n, d, generator=g), torch.randn(b, heads, n, d, generator=g)


def explicit_self_attention(q, k):
    """Head-averaged softmax(QKᵀ/√d), rows = queries: the matrix the official code stores."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(dim=1)


def official_kernel():
    """GaussianSmoothing(channels=1, kernel_size=3, sigma=0.5, dim=2) of the official code, verbatim math."""
    kernel = 1
    grids = torch.meshgrid([torch.arange(3, dtype=torch.float32)] * 2, indexing="ij")
    for std, mgrid in zip([0.5, 0.5], grids):
        mean = 1.0
        kernel = kernel * 1 / (std * math.sqrt(2 * math.pi)) * torch.exp(-((mgrid - mean) / (2 * std)) ** 2)
    return kernel / kernel.sum()


def official_smooth(x):  # [B, C, h, w]
    b, c, h, w = x.shape
    y = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(y, official_kernel()[None, None]).reshape(b, c, h, w)


def official_layer(sa, ca, h, scale):
    """One layer of get_mask: SSGC loop as written (curr = sa@sa each time), sa@ca, grid, bilinear ×scale,
    smoothing; returns the smoothed [B, T, H, W] maps."""
    curr = 0
    curr += sa
    ssgc = curr
    for _ in range(3):
        curr = sa @ sa
        ssgc += curr
    ssgc /= 4
    out = ssgc @ ca
    out = out.transpose(1, 2).reshape(out.shape[0], -1, h, h)
    if scale > 1:
        out = F.interpolate(out, scale_factor=scale, mode="bilinear")
    return official_smooth(out)


# ------------------------------------------------------------------------------------------------
# attention maps without N×N matrices
# ------------------------------------------------------------------------------------------------

def test_cross_attention_map_is_the_head_mean_softmax():
    q, _ = qk(n=12)
    k_text = torch.randn(2, 3, 5, 8, generator=gen(1))
    expected = explicit_self_attention(q, k_text)  # same formula with text keys
    assert torch.allclose(R.cross_attention_map(q, k_text), expected, atol=1e-6)
    assert torch.allclose(R.cross_attention_map(q, k_text).sum(-1), torch.ones(2, 12), atol=1e-5)


@pytest.mark.parametrize("channels", [1, 2, 7, 8, 19])
@pytest.mark.parametrize("fused", [False, True])
def test_self_attention_apply_equals_the_explicit_matrix(channels, fused, monkeypatch):
    """Both routes: one explicit head at a time (small layers) and attention calls with the maps as values."""
    if fused:
        monkeypatch.setattr(R, "SMALL_SELF_ATTENTION", 0)
    q, k = qk(n=16, d=8)
    x = torch.rand(2, 16, channels, generator=gen(2))
    expected = explicit_self_attention(q, k) @ x
    assert torch.allclose(R.self_attention_apply(q, k, x), expected, atol=1e-5)


def test_propagate_matches_the_official_ssgc_loop():
    """Official: ssgc = (S + 3·S²)/4 (the loop adds sa@sa, not successive powers), then ssgc @ ca."""
    q, k = qk(n=16)
    ca = torch.rand(2, 16, 6, generator=gen(3))
    sa = explicit_self_attention(q, k)
    ssgc = (sa + 3 * sa @ sa) / 4
    assert torch.allclose(R.propagate(q, k, ca, 4), ssgc @ ca, atol=1e-5)
    assert torch.equal(R.propagate(q, k, ca, 0), ca)
    assert torch.allclose(R.propagate(q, k, ca, 1), sa @ ca, atol=1e-5)


def test_kernel_is_the_official_one():
    assert torch.allclose(R.official_gaussian_kernel(), official_kernel(), atol=1e-7)


# ------------------------------------------------------------------------------------------------
# the recorder against get_mask
# ------------------------------------------------------------------------------------------------

def test_recorder_reproduces_official_get_mask():
    """As SD1.5 with R = 4 (two 16×16 layers and the 8×8 one, bilinear-upsampled), scaled down:
    latent 16×16, R = 4 → a 4×4 map from two 4×4 layers and one 2×2 layer; cond and uncond rows."""
    b, t = 2, 6
    rec = R.RegionRecorder((16, 16), downsample=4, order=4, reference="foreground (uncond)")
    cond_layers, uncond_layers = [], []
    layers = [(4, 0), (4, 1), (2, 2)]
    for h, seed in layers:
        n = h * h
        for entry, store in ((0, cond_layers), (1, uncond_layers)):
            q, k = qk(b=b, n=n, seed=10 * seed + entry)
            qt = torch.randn(b, 3, t, 8, generator=gen(100 + 10 * seed + entry))
            ca = R.cross_attention_map(q, qt)
            store.append(official_layer(explicit_self_attention(q, k), ca, h, 4 // h))
            maps = R.propagate(q, k, ca, 4)
            if entry == 0:
                rec.add(0, maps, (h, h))
            else:
                rec.add_foreground(1, torch.stack([maps[..., 0], maps[..., 1:].sum(-1)], -1), (h, h))
    regions = rec.finish()
    # official aggregation: per-token spatial normalisation, mean over layers, argmax; fore from uncond
    new_ca = sum(c / (c.mean(dim=(2, 3), keepdim=True) + 1e-8) for c in cond_layers) / len(layers)
    fore = [torch.stack([u[:, 0], u[:, 1:].sum(1)], 1) for u in uncond_layers]
    new_fore = sum(f / f.mean(dim=(2, 3), keepdim=True) for f in fore) / len(layers)
    assert torch.equal(regions.assignment, new_ca.argmax(dim=1))
    max_fore = new_fore.max(dim=1, keepdim=True).values
    official_fg = 1.0 - (new_fore == max_fore).float()[:, 0]
    assert torch.equal(regions.foreground, official_fg.bool())
    assert regions.layers == 3 and regions.tokens == t


def test_layer_selection_and_entries():
    rec = R.RegionRecorder((64, 64), downsample=4, reference="whole image")
    assert rec.target == (16, 16)
    assert rec.wants_layer((16, 16)) and rec.wants_layer((8, 8)) and not rec.wants_layer((32, 32))
    assert rec.wants_entry(0) and not rec.wants_entry(1)
    assert R.RegionRecorder((64, 64), reference="foreground (uncond)").wants_entry(1)
    assert rec.finish() is None  # nothing recorded


def test_finer_token_grids_are_area_pooled():
    maps = torch.rand(1, 64, 3, generator=gen(4))
    pooled = R.to_grid(maps, (8, 8), (4, 4))
    expected = F.avg_pool2d(maps.transpose(1, 2).reshape(1, 3, 8, 8), 2)
    assert torch.allclose(pooled, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# known answers for regions and scales
# ------------------------------------------------------------------------------------------------

def quadrant_maps(b=1, h=4):
    """Token 0 ([SOT]) everywhere weakly; token 1 the left half, token 2 the right half strongly."""
    maps = torch.full((b, 3, h, h), 0.1)
    maps[:, 1, :, : h // 2] = 1.0
    maps[:, 2, :, h // 2:] = 1.0
    return maps


def test_region_assignment_on_known_maps():
    regions = R.regions_from_maps(R.spatial_normalize(quadrant_maps()))
    expected = torch.zeros(1, 4, 4, dtype=torch.long)
    expected[:, :, :2], expected[:, :, 2:] = 1, 2
    assert torch.equal(regions.assignment, expected)


def test_scale_rule_known_answer():
    """Left region ‖g‖ = 1, right region ‖g‖ = 3, foreground = left: r_left = 1, r_right = 1/3 → 0.8."""
    regions = R.regions_from_maps(R.spatial_normalize(quadrant_maps()))
    fg = torch.zeros(1, 4, 4, dtype=torch.bool)
    fg[:, :, :2] = True
    regions.foreground = fg
    diff = torch.zeros(1, 4, 8, 8)
    diff[:, 0, :, :4] = 1.0
    diff[:, 0, :, 4:] = 3.0
    rate = R.region_scale_map(diff, regions, cfg=5.0, smoothing=False)
    assert torch.allclose(rate[..., :4], torch.ones(1, 1, 8, 4))
    assert torch.allclose(rate[..., 4:], torch.full((1, 1, 8, 4), 0.8))
    # foreground = right: left is lifted to 3 (the rate_max clamp), right keeps 1
    regions.foreground = ~fg
    rate = R.region_scale_map(diff, regions, cfg=5.0, smoothing=False)
    assert torch.allclose(rate[..., :4], torch.full((1, 1, 8, 4), 3.0))
    assert torch.allclose(rate[..., 4:], torch.ones(1, 1, 8, 4))
    # max_weight caps cfg·r at 15 → r ≤ 15/7.5 = 2
    rate = R.region_scale_map(diff, regions, cfg=7.5, smoothing=False)
    assert torch.allclose(rate[..., :4], torch.full((1, 1, 8, 4), 2.0))
    # whole-image reference: mean norm 2 → left 2, right 2/3 (inside [0.8, 3]? no: clamped to 0.8)
    regions.foreground = None
    rate = R.region_scale_map(diff, regions, cfg=5.0, smoothing=False, rate_min=0.5)
    assert torch.allclose(rate[..., :4], torch.full((1, 1, 8, 4), 2.0))
    assert torch.allclose(rate[..., 4:], torch.full((1, 1, 8, 4), 2 / 3))


def test_uniform_maps_reduce_to_cfg():
    """Uniform attention: one region, the whole image as reference → r = 1 everywhere, D = CFG."""
    g = gen(5)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    uniform = R.spatial_normalize(torch.ones(2, 5, 4, 4))
    for fore in (None, R.spatial_normalize(torch.ones(2, 2, 4, 4))):  # tie → empty foreground → fallback
        regions = R.regions_from_maps(uniform, fore)
        out = R.scfg_combine(cond, uncond, regions, 6.0)
        assert torch.allclose(out, uncond + 6.0 * (cond - uncond), atol=1e-5)


def test_smoothing_keeps_constants_and_batches_are_independent():
    g = gen(6)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    maps = torch.rand(3, 5, 4, 4, generator=g)
    fore = torch.rand(3, 2, 4, 4, generator=g)
    regions = R.regions_from_maps(maps, fore)
    both = R.scfg_combine(cond, uncond, regions, 5.0)
    for i in range(3):
        alone = R.scfg_combine(cond[i:i + 1], uncond[i:i + 1], R.regions_from_maps(maps[i:i + 1], fore[i:i + 1]), 5.0)
        assert torch.allclose(both[i:i + 1], alone, atol=1e-6)
    assert torch.allclose(R.smooth(torch.full((1, 1, 5, 5), 2.5)), torch.full((1, 1, 5, 5), 2.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    g = gen(7)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    regions = R.regions_from_maps(torch.rand(2, 5, 4, 4, generator=g), torch.rand(2, 2, 4, 4, generator=g))
    ref = R.scfg_combine(cond, uncond, regions, 5.0)
    out = R.scfg_combine(cond.to(dtype), uncond.to(dtype), regions, 5.0)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref, atol=0.1, rtol=0.02)
    q, k = qk(n=16)
    x = torch.rand(2, 16, 5, generator=g)
    half = R.propagate(q.to(dtype), k.to(dtype), x, 4)
    assert half.dtype == torch.float32
    assert torch.allclose(half, R.propagate(q, k, x, 4), atol=0.02)


def test_bad_inputs():
    regions = R.regions_from_maps(torch.rand(1, 3, 4, 4))
    with pytest.raises(R.RegionGuidanceError, match="image latents"):
        R.region_scale_map(torch.zeros(1, 4, 2, 8, 8), regions, 5.0)
    with pytest.raises(R.RegionGuidanceError, match="batch"):
        R.region_scale_map(torch.zeros(2, 4, 8, 8), regions, 5.0)
    with pytest.raises(R.RegionGuidanceError, match="rate_min"):
        R.region_scale_map(torch.zeros(1, 4, 8, 8), regions, 5.0, rate_min=2.0, rate_max=1.0)
    with pytest.raises(R.RegionGuidanceError, match="do not match"):
        R.cross_attention_map(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 3, 4))
    with pytest.raises(R.RegionGuidanceError, match="head_dim"):
        R.cross_attention_map(torch.zeros(4, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(R.RegionGuidanceError, match="grid"):
        R.to_grid(torch.zeros(1, 10, 3), (3, 3), (3, 3))
    with pytest.raises(R.RegionGuidanceError, match="reference"):
        R.RegionRecorder((8, 8), reference="background")
    with pytest.raises(R.RegionGuidanceError, match="foreground maps"):
        R.regions_from_maps(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))


# ------------------------------------------------------------------------------------------------
# the plan stage
# ------------------------------------------------------------------------------------------------

def step_inputs(cond, uncond, regions, cfg=5.0):
    return StepInputs(x=torch.zeros_like(cond), sigma=torch.tensor([1.0]), cond_scale=cfg,
                      position=StepPosition(progress=0.0, step=0.0, n_steps=10), parameterization="ve",
                      cond=cond, uncond=uncond, regions=regions)


def test_plan_stage_scales_the_cfg_weight():
    g = gen(8)
    cond, uncond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    regions = R.regions_from_maps(torch.rand(1, 5, 4, 4, generator=g), torch.rand(1, 2, 4, 4, generator=g))
    plan = GuidancePlan().with_method(SCFG())
    guided, _ = combine(plan, step_inputs(cond, uncond, regions), GuidanceState())
    assert torch.allclose(guided, R.scfg_combine(cond, uncond, regions, 5.0), atol=1e-5)
    assert regions.scale is not None and regions.scale.shape == (1, 1, 8, 8)
    # no regions recorded (outside the window): plain CFG
    plain, _ = combine(plan, step_inputs(cond, uncond, None), GuidanceState())
    assert torch.allclose(plain, uncond + 5.0 * (cond - uncond), atol=1e-5)
    # with APG: G = C + (W·r − 1)·APG(g); at η = 1, no clip, no momentum APG(g) = g → U + W·r·g again
    plan_apg = plan.with_method(APG(eta=1.0, norm_threshold=0.0, momentum=0.0))
    stacked, _ = combine(plan_apg, step_inputs(cond, uncond, regions), GuidanceState())
    assert torch.allclose(stacked, guided, atol=1e-4)


def test_video_latents_get_one_region_map_per_frame():
    """5-D [B, C, T, H, W] predictions: the regions come per frame (frames folded into the batch, frame-major per
    sample); the plan's result equals S-CFG on each frame as an image."""
    g = gen(9)
    b, t = 2, 3
    cond, uncond = torch.randn(b, 4, t, 8, 8, generator=g), torch.randn(b, 4, t, 8, 8, generator=g)
    token_maps, fore_maps = torch.rand(b * t, 5, 4, 4, generator=g), torch.rand(b * t, 2, 4, 4, generator=g)
    plan = GuidancePlan().with_method(SCFG())
    regions = R.regions_from_maps(token_maps, fore_maps)
    guided, _ = combine(plan, step_inputs(cond, uncond, regions), GuidanceState())
    assert guided.shape == cond.shape and regions.scale.shape == (b * t, 1, 8, 8)
    for i in range(b):
        for f in range(t):
            k = i * t + f
            frame = R.regions_from_maps(token_maps[k:k + 1], fore_maps[k:k + 1])
            expected = R.scfg_combine(cond[i:i + 1, :, f], uncond[i:i + 1, :, f], frame, 5.0)
            assert torch.allclose(guided[i:i + 1, :, f], expected, atol=1e-5)
    rate = regions.scale.reshape(b, t, 1, 8, 8).movedim(1, 2)
    pooled = R.fit_to(rate, torch.zeros(b, 4, t, 4, 4))
    assert pooled.shape == (b, 1, t, 4, 4)
    assert torch.allclose(pooled[:, :, 1], F.adaptive_avg_pool2d(rate[:, :, 1], (4, 4)))


def test_plan_validation():
    with pytest.raises(PlanError, match="rate_min"):
        GuidancePlan().with_method(SCFG(rate_min=2.0, rate_max=1.0))
    with pytest.raises(PlanError, match="reference"):
        GuidancePlan().with_method(SCFG(reference="x"))
    plan = GuidancePlan().with_method(SCFG())
    with pytest.raises(PlanError, match="already has S-CFG"):
        plan.with_method(SCFG())
    assert "S-CFG" in plan.inactive_at_cfg_one(uncond_evaluated=False)
