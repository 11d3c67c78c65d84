"""Invariants of the CFG-space methods (METHODS.md invariants 2–6, 12 and each method's section)."""

import pytest
import torch

from guidance_kit.guiders.combine import GuidanceState, combine
from guidance_kit.guiders.methods.apg import APG, apg_direction, clip_norm, split_parallel
from guidance_kit.guiders.methods.beta_cfg import BetaCFG, beta_cfg_factor
from guidance_kit.guiders.methods.cfg_zero_star import CFGZeroStar, optimized_scale, scale_uncond_velocity
from guidance_kit.guiders.methods.fdg import FDG, laplacian_pyramid, max_levels, reconstruct
from guidance_kit.guiders.methods.rescale import Rescale, denoised_from_v, model_output_v, rescale_to_cond_std
from guidance_kit.guiders.methods.tcfg import TCFG, tangential_damping
from guidance_kit.guiders.plan import GuidancePlan
from guidance_kit.guiders.schedules import beta_pdf
from guidance_kit.guiders.tensor_ops import batch_dot, batch_norm, batch_std

from .helpers import cfg_reference, random_triplet, step_inputs

SHAPES = [(2, 4, 8, 8), (1, 16, 3, 8, 8)]


def run(plan, inp, state=None):
    return combine(plan, inp, state or GuidanceState())[0]


def with_(slot, value):
    return GuidancePlan().with_method(value)


# --- invariant 2: CFG only --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w", [0.0, 1.0, 4.5, 12.0])
def test_empty_plan_is_comfyui_cfg_bitwise(shape, w):
    x, c, u = random_triplet(shape)
    assert torch.equal(run(GuidancePlan(), step_inputs(x, c, u, cond_scale=w)), cfg_reference(c, u, w))


# --- APG ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_apg_eta1_no_clip_no_momentum_is_cfg_at_same_scale(shape):
    """Invariant 3 (ComfyUI core gives CFG at w + 1 here)."""
    x, c, u = random_triplet(shape)
    plan = with_("apg", APG(eta=1.0, norm_threshold=0.0, momentum=0.0))
    for w in (2.0, 7.5):
        got = run(plan, step_inputs(x, c, u, cond_scale=w))
        assert torch.allclose(got, cfg_reference(c, u, w), rtol=1e-5, atol=1e-5)
        core = c + w * (c - u)  # core APG node's output at cfg=w with the same settings
        assert torch.allclose(core, cfg_reference(c, u, w + 1), atol=1e-5)
        assert not torch.allclose(got, core, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_apg_eta0_removes_the_parallel_component(shape):
    x, c, u = random_triplet(shape)
    got = run(with_("apg", APG(eta=0.0, norm_threshold=0.0, momentum=0.0)), step_inputs(x, c, u, cond_scale=9.0))
    # D − C is orthogonal to C, per sample over all non-batch dims
    rel = batch_dot(got - c, c).abs() / (batch_norm(got - c) * batch_norm(c))
    assert rel.max() < 1e-5


def test_apg_clip_bound_and_projection_parts():
    x, c, u = random_triplet()
    delta = (c - u) * 10
    for eta in (0.0, 0.5, 1.0, 1.5):
        out, _ = apg_direction(delta, c, eta=eta, norm_threshold=3.0, momentum=0.0, buffer=None)
        assert (batch_norm(out) <= 3.0 * max(1.0, abs(eta)) + 1e-4).all()
    par, orth = split_parallel(delta, c)
    assert torch.allclose(par + orth, delta, atol=1e-5)
    assert (batch_dot(orth, c).abs() < 1e-3).all()
    assert torch.equal(clip_norm(delta, 0.0), delta)  # threshold 0 = off


def test_apg_momentum_is_the_papers_running_sum_and_resets_with_state():
    x, c, u = random_triplet()
    plan = with_("apg", APG(eta=1.0, norm_threshold=0.0, momentum=-0.5))
    state = GuidanceState()
    first = run(plan, step_inputs(x, c, u, cond_scale=3.0), state)
    assert torch.allclose(first, cfg_reference(c, u, 3.0), atol=1e-5)  # buffer starts empty
    second = run(plan, step_inputs(x, c, u, cond_scale=3.0), state)
    # Δ̄_2 = Δ + β·Δ̄_1 = 0.5·Δ  →  D = C + (w − 1)·0.5·Δ
    assert torch.allclose(second, c + 2.0 * 0.5 * (c - u), atol=1e-5)
    fresh = run(plan, step_inputs(x, c, u, cond_scale=3.0), GuidanceState())
    assert torch.allclose(fresh, first)


# --- TCFG -----------------------------------------------------------------------------------------
def svd_reference(x, c, u):
    """TCFG as the paper/core define it, with a full SVD of the 2×d score matrix."""
    b = x.shape[0]
    a_s = (x - u).reshape(b, 1, -1).double()
    b_s = (x - c).reshape(b, 1, -1).double()
    _, _, vh = torch.linalg.svd(torch.cat([a_s, b_s], dim=1), full_matrices=False)
    v1 = vh[:, 0:1, :]
    a_damped = (a_s @ v1.transpose(-2, -1)) * v1
    return (x.double() - a_damped.reshape(x.shape)).to(x.dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_tcfg_matches_the_svd_definition(shape):
    x, c, u = random_triplet(shape)
    assert torch.allclose(tangential_damping(x, c, u), svd_reference(x, c, u), atol=1e-4)


def test_tcfg_parallel_scores_leave_cfg_unchanged_and_is_scale_invariant():
    """Invariant 5: u = k·c in score space → U unchanged."""
    x, c, _ = random_triplet()
    u_par = x - 0.4 * (x - c)
    assert torch.allclose(tangential_damping(x, c, u_par), u_par, atol=1e-5)
    plan = with_("tcfg", TCFG())
    assert torch.allclose(run(plan, step_inputs(x, c, u_par, cond_scale=6)), cfg_reference(c, u_par, 6), atol=1e-4)
    _, c, u = random_triplet(seed=3)
    zero = torch.zeros_like(c)
    scaled = tangential_damping(zero, 3.0 * c, 3.0 * u)  # scores scaled by σ-like factor
    assert torch.allclose(scaled, 3.0 * tangential_damping(zero, c, u), atol=1e-4)
    a_norm = batch_norm(x - u)
    assert (batch_norm(x - tangential_damping(x, c, u)) <= a_norm + 1e-4).all()


# --- CFG-Zero* -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w", [1.5, 4.0, 7.0])
def test_cfg_zero_star_x0_rule_and_velocity_rule_agree(shape, w):
    """Invariant 4: D = s·C + α(1−s)·U + (1−α)(1−s)·x, equal to the velocity-space rule."""
    x, c, u = random_triplet(shape)
    sigma = 0.6
    inp = step_inputs(x, c, u, sigma=sigma, cond_scale=w, parameterization="flow")
    got = run(with_("cfg_zero_star", CFGZeroStar(optimized_scale=True, zero_init_steps=0)), inp)
    alpha = optimized_scale(x, c, u, sigma)
    x0_rule = w * c + alpha * (1 - w) * u + (1 - alpha) * (1 - w) * x
    assert torch.allclose(got, x0_rule, atol=1e-4)
    v_c, v_u = (x - c) / sigma, (x - u) / sigma
    v_hat = alpha * v_u + w * (v_c - alpha * v_u)
    assert torch.allclose(got, x - sigma * v_hat, atol=1e-4)
    core = w * c + alpha * (1 - w) * u  # ComfyUI core CFGZeroStar
    assert torch.allclose(got - core, (1 - alpha) * (1 - w) * x, atol=1e-4)


def test_cfg_zero_star_alpha_one_is_cfg_and_parallel_velocities_give_cond():
    x, c, u = random_triplet()
    assert torch.allclose(scale_uncond_velocity(x, u, torch.ones(2, 1, 1, 1)), u)
    sigma = 0.5
    u_par = x - (x - c) / 0.8  # v_c = 0.8·v_u  →  α* = 0.8, result = C for any scale
    inp = step_inputs(x, c, u_par, sigma=sigma, cond_scale=6.0, parameterization="flow")
    got = run(with_("cfg_zero_star", CFGZeroStar(True, 0)), inp)
    assert torch.allclose(optimized_scale(x, c, u_par, sigma).flatten(), torch.full((2,), 0.8), atol=1e-5)
    assert torch.allclose(got, c, atol=1e-4)


def test_cfg_zero_star_zero_init_steps_count_and_leave_x():
    x, c, u = random_triplet()
    plan = with_("cfg_zero_star", CFGZeroStar(optimized_scale=True, zero_init_steps=2))
    for step, zeroed in ((0, True), (1, True), (2, False)):
        got, handed = combine(plan, step_inputs(x, c, u, step=step), GuidanceState())
        assert torch.equal(got, x) == zeroed
        if zeroed:
            assert torch.equal(handed, x)


# --- FDG ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 4, 13, 9), (1, 16, 3, 16, 12)])
@pytest.mark.parametrize("levels", [2, 3])
def test_fdg_equal_weights_is_cfg(shape, levels):
    """Invariant 6 (perfect reconstruction)."""
    if levels > max_levels(*shape[-2:]):
        pytest.skip("latent too small")
    x, c, u = random_triplet(shape)
    got = run(with_("fdg", FDG(scales=(5.0,) * levels)), step_inputs(x, c, u, cond_scale=99.0))
    assert torch.allclose(got, cfg_reference(c, u, 5.0), atol=1e-4)


def test_fdg_high_weight_only_changes_the_high_band():
    x, c, u = random_triplet((1, 4, 16, 16))
    a = run(with_("fdg", FDG(scales=(9.0, 3.0))), step_inputs(x, c, u))
    b = run(with_("fdg", FDG(scales=(4.0, 3.0))), step_inputs(x, c, u))
    high_band = laplacian_pyramid(c - u, 2)[0]
    assert torch.allclose(a - b, 5.0 * high_band, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 16, 5, 11, 14)])
def test_pyramid_round_trip(shape):
    t = torch.randn(shape)
    for levels in range(1, max_levels(*shape[-2:]) + 1):
        bands = laplacian_pyramid(t, levels)
        assert all(b.ndim == t.ndim for b in bands)
        assert torch.allclose(reconstruct(bands), t, atol=1e-5)


def test_fdg_too_many_levels_is_a_clear_error():
    x, c, u = random_triplet((1, 4, 8, 8))
    with pytest.raises(ValueError, match="at most"):
        run(with_("fdg", FDG(scales=(5.0, 4.0, 3.0, 2.0))), step_inputs(x, c, u))


# --- β-CFG ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_beta_cfg_reduces_to_cfg_with_uniform_curve_and_no_normalisation(shape):
    x, c, u = random_triplet(shape)
    got = run(with_("beta_cfg", BetaCFG(a=1.0, b=1.0, gamma=0.0)), step_inputs(x, c, u, cond_scale=6.0))
    assert torch.allclose(got, cfg_reference(c, u, 6.0), atol=1e-5)


@pytest.mark.parametrize("parameterization", ["ve", "flow"])
def test_beta_cfg_gamma1_guidance_length_is_s_beta_sigma(parameterization):
    """L2 (paper): ‖D̂ − U‖ = s·β(τ)·σ exactly (fixed-length guidance in ε/v space)."""
    x, c, u = random_triplet()
    sigma, s, step, n = 0.7, 5.0, 3, 10
    got = run(with_("beta_cfg", BetaCFG(a=2.0, b=3.0, gamma=1.0, normalization="l2")),
              step_inputs(x, c, u, sigma=sigma, cond_scale=s, step=step, n_steps=n, parameterization=parameterization))
    expected = s * beta_pdf(step / (n - 1), 2.0, 3.0) * sigma
    assert torch.allclose(batch_norm(got - u).flatten(), torch.full((2,), expected), rtol=1e-5)


def test_beta_cfg_no_guidance_at_first_and_last_step_and_peak_normalisation():
    x, c, u = random_triplet()
    plan = with_("beta_cfg", BetaCFG(a=2.0, b=2.0, gamma=1.0))
    for step in (0, 9):
        assert torch.allclose(run(plan, step_inputs(x, c, u, step=step, n_steps=10)), u)
    f = beta_cfg_factor(c, u, 1.0, 0.5, 2.0, 2.0, gamma=0.0, normalize_peak=True)
    assert torch.allclose(f, torch.ones_like(f))
    assert torch.equal(beta_cfg_factor(c, c, 1.0, 0.5, 2.0, 2.0, gamma=1.0), torch.zeros(2, 1, 1, 1))


# --- Rescale --------------------------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["ve", "flow"])
def test_rescale_invariants(parameterization):
    x, c, u = random_triplet()
    sigma = torch.tensor([0.8, 0.4])
    guided = cfg_reference(c, u, 7.0)
    assert torch.equal(rescale_to_cond_std(guided, c, x, sigma, parameterization, 0.0), guided)
    full = rescale_to_cond_std(guided, c, x, sigma, parameterization, 1.0)
    s = sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(batch_std(model_output_v(full, x, s, parameterization)),
                          batch_std(model_output_v(c, x, s, parameterization)), rtol=1e-4)
    assert torch.allclose(rescale_to_cond_std(c, c, x, sigma, parameterization, 0.7), c, atol=1e-5)  # w = 1
    v = model_output_v(guided, x, s, parameterization)
    assert torch.allclose(denoised_from_v(v, x, s, parameterization), guided, atol=1e-5)


def test_rescale_ve_matches_comfyui_rescalecfg_formula():
    x, c, u = random_triplet()
    sigma, w, phi = 2.0, 7.0, 0.7
    got = run(with_("rescale", Rescale(phi)), step_inputs(x, c, u, sigma=sigma, cond_scale=w))
    # ComfyUI core RescaleCFG (VP v-prediction of a VE-sampled model)
    xs = x / (sigma ** 2 + 1)
    v_c = (xs - c) * (sigma ** 2 + 1) ** 0.5 / sigma
    v_u = (xs - u) * (sigma ** 2 + 1) ** 0.5 / sigma
    v_cfg = v_u + w * (v_c - v_u)
    v_re = v_cfg * v_c.std(dim=(1, 2, 3), keepdim=True) / v_cfg.std(dim=(1, 2, 3), keepdim=True)
    v_final = phi * v_re + (1 - phi) * v_cfg
    core = xs - v_final * sigma / (sigma ** 2 + 1) ** 0.5
    assert torch.allclose(got, core, atol=1e-4)


def test_rescale_flow_is_done_on_the_velocity():
    x, c, u = random_triplet()
    sigma, w = 0.5, 6.0
    got = run(with_("rescale", Rescale(1.0)), step_inputs(x, c, u, sigma=sigma, cond_scale=w, parameterization="flow"))
    v_got, v_c = (x - got) / sigma, (x - c) / sigma
    assert torch.allclose(batch_std(v_got), batch_std(v_c), rtol=1e-4)
