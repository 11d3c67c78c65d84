"""Dynamic thresholding, Skimmed CFG, power-law CFG, ADG, Momentum Guidance and SMC-CFG (issue 18, part A):
each against its reference implementation's formula (our own transcription, on random tensors), its documented
effect on the exact Gaussian mixture, batches, 5-D latents, half precision, cfg 1 and bad settings."""

import math

import pytest
import torch

from guidance_kit.guiders.combine import GuidanceState, combine
from guidance_kit.guiders.methods.adg import ADG, angle_domain_guidance
from guidance_kit.guiders.methods.apg import APG
from guidance_kit.guiders.methods.cfg_zero_star import CFGZeroStar
from guidance_kit.guiders.methods.dynamic_thresholding import DynamicThresholding, row_quantile
from guidance_kit.guiders.methods.momentum_guidance import MomentumGuidance
from guidance_kit.guiders.methods.power_law_cfg import PowerLawCFG
from guidance_kit.guiders.methods.skimmed_cfg import SkimmedCFG, skimming_mask
from guidance_kit.guiders.methods.smc_cfg import SMCCFG
from guidance_kit.guiders.plan import CfgOne, GuidancePlan, PlanError

from .gmm import GaussianMixture, flow_sigmas, karras_sigmas
from .helpers import cfg_reference, random_triplet, sample_plan, step_inputs

SHAPES = [(2, 4, 8, 8), (2, 16, 3, 8, 8)]
METHODS = [DynamicThresholding(mimic_scale=3.0, percentile=0.99), SkimmedCFG(skimming_scale=3.0), PowerLawCFG(),
           ADG(), MomentumGuidance(), SMCCFG()]
IDS = [m.KEY for m in METHODS]


def run(plan, inp, state=None):
    return combine(plan, inp, state or GuidanceState())[0]


def plan_of(*methods):
    return GuidancePlan.of(*methods)


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(11)
    directions = torch.randn((3, 2, 8, 8), generator=g, dtype=torch.float64)
    means = 1.5 * directions / directions.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) * 4
    return GaussianMixture(means, std=1.0)


def mixture_predictions(gmm, sigma, n=6, seed=0, parameterization="ve", label=0, drawn_from=None):
    """x at noise level σ (drawn from the noised marginal of class ``drawn_from``, default ``label``) and the
    exact C (conditioned on ``label``) and U there (float32)."""
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(label if drawn_from is None else drawn_from, n, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = x0 + sigma * noise if parameterization == "ve" else (1 - sigma) * x0 + sigma * noise
    sig = torch.full((n,), float(sigma), dtype=torch.float64)
    cond = gmm.denoise_cond(x, sig, label, parameterization)
    uncond = gmm.denoise_uncond(x, sig, parameterization)
    return x.float(), cond.float(), uncond.float()


# ------------------------------------------------------------------------------------------------
# every method: batches, 5-D latents, half precision, determinism
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_a_batch_equals_its_samples_one_by_one(method, shape):
    x, c, u = random_triplet(shape, seed=3)
    plan = plan_of(method)
    steps = [step_inputs(x, c, u, sigma=s, cond_scale=9.0, step=i) for i, s in enumerate((3.0, 1.5, 0.5))]
    batch_state, batch = GuidanceState(), []
    for inp in steps:
        batch.append(run(plan, inp, batch_state))
    for i in range(shape[0]):
        state = GuidanceState()
        for k, inp in enumerate(steps):
            single = step_inputs(x[i:i + 1], c[i:i + 1], u[i:i + 1], sigma=inp.sigma_value, cond_scale=9.0, step=k)
            assert torch.allclose(run(plan, single, state), batch[k][i:i + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch[-1], cfg_reference(c, u, 9.0), atol=1e-4)  # and it acts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_half_precision_gives_finite_results_in_its_dtype(method, dtype):
    x, c, u = random_triplet((2, 4, 8, 8), dtype=dtype)
    got = run(plan_of(method), step_inputs(x, c, u, cond_scale=12.0))
    assert got.dtype == dtype and bool(torch.isfinite(got).all())


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_a_new_run_state_repeats_the_run(method):
    x, c, u = random_triplet((2, 4, 8, 8))
    plan = plan_of(method)

    def steps():
        state = GuidanceState()
        return [run(plan, step_inputs(x, c, u, sigma=s, cond_scale=8.0, step=i), state)
                for i, s in enumerate((2.0, 1.0))]

    assert all(torch.equal(a, b) for a, b in zip(steps(), steps()))


def test_cfg_one_declarations():
    plan = GuidancePlan()
    assert DynamicThresholding().cfg_one(plan) is CfgOne.INACTIVE  # no guidance to rescale at cfg 1
    assert DynamicThresholding(mode="imagen").cfg_one(plan) is CfgOne.ACTS  # clamps the conditional prediction
    assert SkimmedCFG().cfg_one(plan) is CfgOne.INACTIVE
    assert PowerLawCFG().cfg_one(plan) is CfgOne.NEEDS_UNCOND  # ω = ‖Δs‖^α ≠ 1 at cfg 1
    assert ADG().cfg_one(plan) is CfgOne.INACTIVE
    assert SMCCFG().cfg_one(plan) is CfgOne.INACTIVE
    assert MomentumGuidance().cfg_one(plan) is CfgOne.ACTS  # the paper's use without CFG


@pytest.mark.parametrize("method", [DynamicThresholding(), SkimmedCFG(), ADG(), SMCCFG()], ids=lambda m: m.KEY)
def test_without_the_uncond_the_inactive_methods_return_the_conditional_prediction(method):
    x, c, _ = random_triplet((2, 4, 8, 8))
    assert torch.equal(run(plan_of(method), step_inputs(x, c, None, cond_scale=1.0)), c)


@pytest.mark.parametrize("bad", [
    lambda: DynamicThresholding(mode="clip"), lambda: DynamicThresholding(percentile=0.0),
    lambda: DynamicThresholding(mimic_scale=0.5), lambda: DynamicThresholding(interpolate_phi=2.0),
    lambda: SkimmedCFG(skimming_scale=-1.0), lambda: PowerLawCFG(alpha=-1.0), lambda: ADG(max_angle=2.0),
    lambda: MomentumGuidance(beta=1.0), lambda: MomentumGuidance(alpha=-0.1), lambda: SMCCFG(gain=-0.2),
])
def test_bad_settings_are_plan_errors_naming_the_method(bad):
    method = bad()
    with pytest.raises(PlanError, match=method.label):
        GuidancePlan().with_method(method)


# ------------------------------------------------------------------------------------------------
# Dynamic thresholding
# ------------------------------------------------------------------------------------------------

def dynthres_reference(cond, uncond, cfg, mimic, percentile, separate_channels):
    """sd-dynamic-thresholding's default mode (constant scales, MEAN, AD, φ = 1) transcribed on x0: per
    (sample, channel) rows with separate channels, else over the whole batch."""
    relative = cond - uncond
    mim_target = uncond + relative * mimic
    cfg_target = uncond + relative * cfg
    mim_flat, cfg_flat = mim_target.flatten(2), cfg_target.flatten(2)
    mim_centered = mim_flat - mim_flat.mean(dim=2, keepdim=True)
    cfg_means = cfg_flat.mean(dim=2, keepdim=True)
    cfg_centered = cfg_flat - cfg_means
    if separate_channels:
        mim_ref = mim_centered.abs().max(dim=2).values.unsqueeze(2)
        cfg_ref = torch.quantile(cfg_centered.abs(), percentile, dim=2).unsqueeze(2)
    else:
        mim_ref = mim_centered.abs().max()
        cfg_ref = torch.quantile(cfg_centered.abs(), percentile)
    top = torch.maximum(mim_ref, cfg_ref)
    result = cfg_centered.clamp(-top, top) / top * mim_ref + cfg_means
    return result.unflatten(2, mim_target.shape[2:])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("percentile", [1.0, 0.95])
def test_dynamic_thresholding_equals_the_reference_formula_per_channel(shape, percentile):
    x, c, u = random_triplet(shape, seed=5)
    plan = plan_of(DynamicThresholding(mimic_scale=4.0, percentile=percentile))
    got = run(plan, step_inputs(x, c, u, cond_scale=15.0))
    assert torch.allclose(got, dynthres_reference(c, u, 15.0, 4.0, percentile, True), rtol=1e-4, atol=1e-5)


def test_dynamic_thresholding_per_sample_is_the_reference_on_each_sample_alone():
    """Without separate channels the reference measures the whole batch (a batch changes each image); here each
    sample is measured alone: the reference on a batch of one."""
    x, c, u = random_triplet((3, 4, 8, 8), seed=6)
    got = run(plan_of(DynamicThresholding(mimic_scale=4.0, percentile=0.97, per_channel=False)),
              step_inputs(x, c, u, cond_scale=15.0))
    for i in range(3):
        expected = dynthres_reference(c[i:i + 1], u[i:i + 1], 15.0, 4.0, 0.97, False)
        assert torch.allclose(got[i:i + 1], expected, rtol=1e-4, atol=1e-5)


def test_row_quantile_is_torch_quantile():
    values = torch.randn(5, 333, generator=torch.Generator().manual_seed(1))
    for q in (0.0, 0.5, 0.9, 0.995, 1.0):
        assert torch.allclose(row_quantile(values, q), torch.quantile(values, q, dim=1), atol=1e-6)


@pytest.mark.parametrize("sigma", [8.0, 2.0, 0.5])
def test_dynamic_thresholding_keeps_x0_within_the_mimic_range_on_the_mixture(mixture, sigma):
    """Around the guided prediction's own channel means, every value stays within the largest deviation of the
    mimic-scale prediction (CFG at 12 leaves that range where the prompt disagrees with the latent)."""
    x, c, u = mixture_predictions(mixture, sigma, label=1, drawn_from=0)
    got = run(plan_of(DynamicThresholding(mimic_scale=3.0, percentile=0.99)), step_inputs(x, c, u, sigma=sigma,
                                                                                         cond_scale=12.0))
    mimic = (u + 3.0 * (c - u)).flatten(2)
    bound = (mimic - mimic.mean(2, keepdim=True)).abs().amax(2, keepdim=True)
    plain = cfg_reference(c, u, 12.0).flatten(2)
    centre = plain.mean(2, keepdim=True)
    assert ((got.flatten(2) - centre).abs() <= bound + 1e-5).all()
    assert ((plain - centre).abs() > bound + 1e-3).any()


def test_imagen_thresholding_keeps_x0_within_the_data_range(mixture):
    x, c, u = mixture_predictions(mixture, 2.0)
    got = run(plan_of(DynamicThresholding(mode="imagen", percentile=0.995, data_range=1.5)),
              step_inputs(x, c, u, sigma=2.0, cond_scale=12.0))
    assert got.abs().max() <= 1.5 + 1e-5
    assert cfg_reference(c, u, 12.0).abs().max() > 3.0


def test_dynamic_thresholding_keeps_sampled_images_near_the_mimic_scales_range(mixture):
    sigmas = karras_sigmas(30)
    cfg12, _ = sample_plan(GuidancePlan(), mixture, 0, 12.0, sigmas, n=64)
    cfg3, _ = sample_plan(GuidancePlan(), mixture, 0, 3.0, sigmas, n=64)
    mimic, _ = sample_plan(plan_of(DynamicThresholding(mimic_scale=3.0)), mixture, 0, 12.0, sigmas, n=64)
    spread = [s.flatten(1).std(dim=1).mean().item() for s in (cfg12, cfg3, mimic)]
    assert abs(spread[2] - spread[1]) < abs(spread[0] - spread[1]) / 2


# ------------------------------------------------------------------------------------------------
# Skimmed CFG
# ------------------------------------------------------------------------------------------------

def skimmed_reference(x, cond, uncond, scale, skim, full_skim_negative=False, flipping_filter=True):
    """Skimmed_CFG's pre-CFG patch (uncond pass, then cond pass against the new uncond, each editing its
    tensor in place), then ComfyUI's CFG."""
    def mask(a, b):
        denoised = x - ((x - b) + scale * ((x - a) - (x - b)))
        keep = ((a - b).sign() == a.sign()) & (a.sign() == (a * scale - b * (scale - 1)).sign())
        if flipping_filter:
            keep = keep & (denoised.sign() == (denoised - x).sign())
        return keep, denoised

    def skim_pass(a, b, k):
        outer, denoised = mask(a, b)
        low = x - ((x - b) + k * ((x - a) - (x - b)))
        a = a.clone()
        a[outer] = a[outer] - (denoised - low)[outer] / scale
        return a

    new_uncond = skim_pass(uncond, cond, 0.0 if full_skim_negative else skim)
    new_cond = skim_pass(cond, new_uncond, skim)
    return new_uncond + (new_cond - new_uncond) * scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("full,flipping", [(False, True), (True, True), (False, False)])
def test_skimmed_cfg_equals_the_reference_formula(shape, full, flipping):
    x, c, u = random_triplet(shape, seed=8)
    plan = plan_of(SkimmedCFG(4.0, full, flipping))
    got = run(plan, step_inputs(x, c, u, cond_scale=11.0))
    assert torch.allclose(got, skimmed_reference(x, c, u, 11.0, 4.0, full, flipping), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, cfg_reference(c, u, 11.0), atol=1e-3)


@pytest.mark.parametrize("parameterization,sigma", [("ve", 6.0), ("ve", 1.0), ("flow", 0.7), ("flow", 0.3)])
def test_skimmed_cfg_damps_exactly_where_cfg_overshoots_both_predictions(mixture, parameterization, sigma):
    x, c, u = mixture_predictions(mixture, sigma, parameterization=parameterization)
    scale, skim = 12.0, 3.0
    inp = step_inputs(x, c, u, sigma=sigma, cond_scale=scale, parameterization=parameterization)
    got = run(plan_of(SkimmedCFG(skim)), inp)
    plain = cfg_reference(c, u, scale)
    # never stronger than CFG, value by value
    assert ((got - c).abs() <= (plain - c).abs() + 1e-5).all()
    # where CFG of C over U' overshoots both, the value is CFG at the skimming scale
    new_uncond = SkimmedCFG(skim).rewrite_uncond(inp, u)
    acted = skimming_mask(x, c, new_uncond, scale)
    assert acted.any()
    low = new_uncond + skim * (c - new_uncond)
    assert torch.allclose(got[acted], low[acted], atol=1e-5)
    # and there it no longer overshoots both predictions by CFG's margin
    beyond = torch.minimum((got - c).abs(), (got - u).abs())
    assert (beyond[acted] <= torch.minimum((plain - c).abs(), (plain - u).abs())[acted] + 1e-5).all()


def test_skimmed_cfg_only_damps_below_its_scale():
    x, c, u = random_triplet((2, 4, 8, 8))
    plan = plan_of(SkimmedCFG(7.0))
    assert torch.allclose(run(plan, step_inputs(x, c, u, cond_scale=5.0)), cfg_reference(c, u, 5.0), atol=1e-6)
    assert SkimmedCFG(7.0).cfg_notes(5.0) and not SkimmedCFG(7.0).cfg_notes(9.0)


# ------------------------------------------------------------------------------------------------
# Power-law CFG
# ------------------------------------------------------------------------------------------------

def power_law_reference(cond, uncond, cfg, sigma, alpha, flow):
    """The ComfyUI port's formula (powerlaw-cfg_cui-ggf)."""
    s = sigma.view((cond.shape[0],) + (1,) * (cond.ndim - 1))
    ds = cond - uncond
    ds = ds * ((1 - s) / (s ** 2 + 1) if flow else 1 / (s ** 2 + 1))
    l2 = torch.norm(ds, p=2, dim=list(range(1, ds.ndim)), keepdim=True)
    phi = (torch.pow(l2 + 1e-6, alpha) * cfg).clamp(min=1.0)
    return uncond + (cond - uncond) * phi


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("parameterization,sigma", [("ve", 3.0), ("flow", 0.6)])
@pytest.mark.parametrize("alpha", [0.9, -0.5])
def test_power_law_cfg_equals_the_reference_formula(shape, parameterization, sigma, alpha):
    x, c, u = random_triplet(shape, seed=9)
    inp = step_inputs(x, c, u, sigma=sigma, cond_scale=5.0, parameterization=parameterization)
    got = run(plan_of(PowerLawCFG(alpha)), inp)
    expected = power_law_reference(c, u, 5.0, inp.sigma, alpha, parameterization == "flow")
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_power_law_cfg_at_alpha_zero_is_cfg():
    x, c, u = random_triplet((2, 4, 8, 8))
    got = run(plan_of(PowerLawCFG(0.0)), step_inputs(x, c, u, cond_scale=6.0))
    assert torch.allclose(got, cfg_reference(c, u, 6.0), atol=1e-5)


def test_power_law_cfg_guides_harder_where_the_scores_differ_more(mixture):
    """On the mixture, samples whose conditional and unconditional predictions differ more get a larger weight
    (α > 0), the others a smaller one (α < 0)."""
    x, c, u = mixture_predictions(mixture, 2.0, n=8, label=1, drawn_from=0)
    difference = (c - u).flatten(1).norm(dim=1)
    for alpha, sign in ((0.8, 1.0), (-0.5, -1.0)):
        got = run(plan_of(PowerLawCFG(alpha)), step_inputs(x, c, u, sigma=2.0, cond_scale=6.0 if alpha > 0 else 60.0))
        weight = ((got - u).flatten(1) * (c - u).flatten(1)).sum(1) / (c - u).flatten(1).square().sum(1)
        order = difference.argsort()
        assert (sign * weight[order].diff() >= -1e-5).all()
        assert weight.max() - weight.min() > 1e-3


# ------------------------------------------------------------------------------------------------
# ADG
# ------------------------------------------------------------------------------------------------

def adg_reference(cond, uncond, cfg, angle=3.14 / 3):
    """ADG_SD3's guidance step on the denoised predictions (method/ADG_SD3.py with utils.py)."""
    n = cond.shape[0]
    weight = cfg - 1
    weight = weight * (weight > 0) + 1e-3
    text, unc = cond.reshape(n, -1).double(), uncond.reshape(n, -1).double()
    cos = ((text / text.norm(dim=1, keepdim=True)) * (unc / unc.norm(dim=1, keepdim=True))).sum(1, keepdim=True)
    theta = torch.acos(cos)
    theta_new = torch.clip(weight * theta, -angle, angle)
    diff = text - unc
    perp = diff - (diff * unc).sum(1, keepdim=True) / ((unc * unc).sum(1, keepdim=True) + 1e-8) * unc
    new = torch.cos(theta_new) * text
    new = new + perp * torch.sin(theta_new) / torch.sin(theta) * (torch.sin(theta) > 1e-3) \
        + perp * weight * (torch.sin(theta) <= 1e-3)
    return new.reshape(cond.shape).float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", [1.5, 4.0, 12.0])
def test_adg_equals_the_official_formula(shape, cfg):
    x, c, u = random_triplet(shape, seed=10)
    got = run(plan_of(ADG()), step_inputs(x, c, u, cond_scale=cfg))
    assert torch.allclose(got, adg_reference(c, u, cfg), rtol=1e-4, atol=1e-5)
    assert torch.allclose(angle_domain_guidance(c, u, cfg, 3.14 / 3), adg_reference(c, u, cfg), atol=1e-5)


@pytest.mark.parametrize("sigma", [8.0, 4.0, 2.0])
def test_adg_rotates_away_from_the_uncond_without_inflating_the_norm(mixture, sigma):
    x, c, u = mixture_predictions(mixture, sigma, label=1, drawn_from=0)
    got = run(plan_of(ADG()), step_inputs(x, c, u, sigma=sigma, cond_scale=15.0))
    plain = cfg_reference(c, u, 15.0)

    def norm(t):
        return t.flatten(1).norm(dim=1)

    def angle(a, b):
        return torch.acos((a.flatten(1) * b.flatten(1)).sum(1) / (norm(a) * norm(b))).clamp(0, math.pi)

    assert (norm(got) <= math.sqrt(2) * norm(c) * (1 + 1e-5)).all()
    assert (norm(plain) > math.sqrt(2) * norm(c)).all()
    assert (angle(got, u) > angle(c, u)).all()  # rotated further from the unconditional prediction


# ------------------------------------------------------------------------------------------------
# SMC-CFG
# ------------------------------------------------------------------------------------------------

def smc_reference_run(steps, cfg, lam, gain):
    """CFG-Ctrl's _cfg_ctrl_apply over a run, on model outputs p = (x − D)/σ; returns the guided x0s."""
    previous, out = None, []
    for x, c, u, sigma in steps:
        posi, nega = (x - c) / sigma, (x - u) / sigma
        guidance = posi - nega
        if previous is None:
            previous = guidance
        surface = (guidance - previous) + lam * previous
        guidance = guidance - gain * torch.sign(surface)
        previous = guidance
        out.append(x - sigma * (nega + cfg * guidance))
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam,gain", [(5.0, 0.2), (0.05, 0.3)])
def test_smc_cfg_equals_the_official_formula_over_a_run(shape, lam, gain):
    steps, inputs = [], []
    for i, sigma in enumerate((4.0, 2.0, 1.0, 0.4)):
        x, c, u = random_triplet(shape, seed=20 + i)
        steps.append((x, c, u, sigma))
        inputs.append(step_inputs(x, c, u, sigma=sigma, cond_scale=6.0, step=i))
    state = GuidanceState()
    got = [run(plan_of(SMCCFG(lam, gain)), inp, state) for inp in inputs]
    for g, expected in zip(got, smc_reference_run(steps, 6.0, lam, gain)):
        assert torch.allclose(g, expected, rtol=1e-4, atol=1e-4)


def test_smc_cfg_adds_a_switching_term_of_fixed_size_on_the_mixture(mixture):
    """Every value moves by exactly W·σ·K from CFG (the switching control, in x0 units), in the direction of
    −sign(s) in velocity space; at the first step s = λ·e, so the term damps the guidance (no overshoot)."""
    x, c, u = mixture_predictions(mixture, 2.0)
    got = run(plan_of(SMCCFG(5.0, 0.2)), step_inputs(x, c, u, sigma=2.0, cond_scale=5.0))
    step = got - cfg_reference(c, u, 5.0)
    assert torch.allclose(step.abs(), torch.full_like(step, 5.0 * 2.0 * 0.2), atol=1e-4)
    assert torch.equal(step.sign(), -(c - u).sign())


# ------------------------------------------------------------------------------------------------
# Momentum Guidance
# ------------------------------------------------------------------------------------------------

def momentum_reference_run(velocities, alpha, beta):
    """The reference sampler's get_guided_velocity (flow-control MomentumGuidedSampler) over a run."""
    momentum, out = None, []
    for v in velocities:
        if momentum is None:
            momentum = v
        out.append(v + alpha * (v - momentum))
        momentum = (1 - beta) * v + beta * momentum
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_momentum_guidance_equals_the_reference_formula_over_a_run(shape, cfg):
    inputs, velocities = [], []
    for i, sigma in enumerate((0.9, 0.6, 0.3, 0.1)):
        x, c, u = random_triplet(shape, seed=30 + i)
        inp = step_inputs(x, c, u if cfg != 1.0 else None, sigma=sigma, cond_scale=cfg, step=i,
                          parameterization="flow")
        inputs.append(inp)
        velocities.append((x - run(GuidancePlan(), inp)) / sigma)
    state = GuidanceState()
    got = [run(plan_of(MomentumGuidance(0.7, 0.6)), inp, state) for inp in inputs]
    for g, inp, v in zip(got, inputs, momentum_reference_run(velocities, 0.7, 0.6)):
        assert torch.allclose((inp.x - g) / inp.sigma_value, v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("parameterization,sigmas", [("flow", flow_sigmas(20)), ("ve", karras_sigmas(20))])
def test_momentum_guidance_sharpens_the_samples_at_cfg_one_on_the_mixture(mixture, parameterization, sigmas):
    """Without CFG, plain sampling of the exact denoisers reproduces the class (per-sample spread ≈ the data's 1);
    extrapolating the velocity away from its running average counteracts smoothing: every sample gets more
    contrast around its class mean, growing with α, and stays in its class."""
    spread = []
    for alpha in (0.0, 0.5, 1.0):
        plan = plan_of(MomentumGuidance(alpha, 0.5)) if alpha else GuidancePlan()
        samples, _ = sample_plan(plan, mixture, 0, 1.0, sigmas, n=128, parameterization=parameterization)
        assert (mixture.classify(samples) == 0).double().mean() > 0.95
        spread.append((samples - mixture.means[0]).flatten(1).std(dim=1).mean().item())
    assert spread[0] == pytest.approx(1.0, abs=0.1)
    assert spread[0] + 0.05 < spread[1] < spread[2] - 0.05


# ------------------------------------------------------------------------------------------------
# stacking in the plan
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_each_stacks_with_cfg_zero_star_and_apg_in_any_order(method):
    partners = (CFGZeroStar(zero_init_steps=0), APG())

    def two_steps(plan):
        state, out = GuidanceState(), None
        for i, sigma in enumerate((2.0, 1.0)):
            x, c, u = random_triplet((2, 4, 8, 8), seed=40 + i)
            out = run(plan, step_inputs(x, c, u, sigma=sigma, cond_scale=9.0, step=i), state)
        return out

    forward = two_steps(plan_of(method, *partners))
    assert torch.equal(forward, two_steps(plan_of(*reversed(partners), method)))
    assert not torch.allclose(forward, two_steps(plan_of(*partners)), atol=1e-4)
    assert not torch.allclose(forward, two_steps(plan_of(method)), atol=1e-4)


def test_smc_cfg_automatic_gain_is_the_official_one_on_flow_models_and_smaller_on_eps_models():
    assert SMCCFG().for_model("flow").gain == 0.2
    assert SMCCFG().for_model("ve").gain == pytest.approx(0.02)
    assert SMCCFG(gain=0.1).for_model("ve").gain == 0.1
    x, c, u = random_triplet((2, 4, 8, 8))
    state = GuidanceState()
    resolved = GuidancePlan.of(SMCCFG()).for_model("ve")
    got = run(resolved, step_inputs(x, c, u, sigma=3.0, cond_scale=5.0), state)
    assert torch.allclose((got - cfg_reference(c, u, 5.0)).abs(), torch.full_like(c, 5.0 * 3.0 * 0.02), atol=1e-4)
