"""Perp-Neg, Dynamic Negative Guidance, Feedback Guidance, CADS and CFG-Rejection on exact Gaussian-mixture
denoisers and random tensors: each method's documented effect, its reference formula, batches, 5-D latents,
dtypes, cfg 1 and stacking with CFG-Zero*, APG and a perturbation term."""

import math

import pytest
import torch

from guidance_kit.guiders.combine import GuidanceState, combine
from guidance_kit.guiders.methods.apg import APG
from guidance_kit.guiders.methods.cads import CADS, anneal_condition, annealing
from guidance_kit.guiders.methods.cfg_rejection import CFGRejection, score_increment, weakest
from guidance_kit.guiders.methods.cfg_zero_star import CFGZeroStar
from guidance_kit.guiders.methods.dng import DynamicNegativeGuidance
from guidance_kit.guiders.methods.extra_guidance import ExtraGuidance
from guidance_kit.guiders.methods.fbg import (
    FeedbackGuidance,
    fbg_scale,
    offset_from_t0,
    temperature_from_t1,
    transition_variances,
)
from guidance_kit.guiders.methods.perp_neg import PerpNeg, perp_neg_step, perpendicular_negative
from guidance_kit.guiders.methods.posterior import kernel
from guidance_kit.guiders.plan import Branch, CfgOne, GuidancePlan, PlanError
from guidance_kit.guiders.progress import step_position
from guidance_kit.guiders.step import StepInputs
from guidance_kit.guiders.tensor_ops import batch_dot

from .gmm import GaussianMixture, euler_sample, flow_sigmas, karras_sigmas
from .helpers import PlanDenoiser, cfg_reference, percent_convention, random_triplet, step_inputs

SHAPE = (2, 8, 8)
SHAPES = [(3, 4, 8, 8), (2, 4, 3, 8, 8)]
NEGATIVE = Branch("Perp-Neg negative", source="uncond")
DNG_NEGATIVE = Branch("DNG negative", source="uncond")


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(11)
    directions = torch.randn((3,) + SHAPE, generator=g, dtype=torch.float64)
    directions = directions / directions.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    return GaussianMixture(1.2 * directions, std=1.0)


def run(plan, inp, state=None):
    return combine(plan, inp, state or GuidanceState())[0]


def fraction_of_class(gmm, samples, label):
    return (gmm.classify(samples) == label).double().mean().item()


# ------------------------------------------------------------------------------------------------
# Perp-Neg
# ------------------------------------------------------------------------------------------------

def test_perp_neg_component_is_orthogonal_to_the_positive_direction_on_the_mixture(mixture):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((16,) + SHAPE, generator=g, dtype=torch.float64) * 3.0
    sigma = torch.full((16,), 3.0, dtype=torch.float64)
    cond, uncond = mixture.denoise_cond(x, sigma, 0), mixture.denoise_uncond(x, sigma)
    negative = mixture.denoise_cond(x, sigma, 1)
    inp = step_inputs(x, cond, uncond, sigma=3.0, cond_scale=6.0, branches={NEGATIVE.name: negative})
    guided = run(GuidancePlan.of(PerpNeg(NEGATIVE, neg_scale=1.5)), inp)
    component = guided.float() - cfg_reference(cond, uncond, 6.0).float()
    positive = (cond - uncond).float()
    norms = component.flatten(1).norm(dim=1) * positive.flatten(1).norm(dim=1)
    cosine = batch_dot(component, positive).flatten() / norms
    assert component.abs().max() > 1e-3  # the negative acts
    assert cosine.abs().max() < 1e-5  # and only perpendicular to C − U
    # and it is −w·s times the perpendicular part of N − U
    expected = -6.0 * 1.5 * perpendicular_negative(cond, uncond, negative)
    assert torch.allclose(component, expected, atol=1e-5)


def test_perp_neg_moves_samples_away_from_the_negative_class(mixture):
    sigmas = karras_sigmas(40)
    plan = GuidancePlan.of(PerpNeg(NEGATIVE, neg_scale=2.0))
    noise = torch.randn((512,) + SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    negative_fn = {NEGATIVE.name: lambda x, s: mixture.denoise_cond(x, s, 1)}
    den = PlanDenoiser(plan, mixture, 0, 3.0, sigmas, branch_fns=negative_fn)
    guided = euler_sample(den, noise, sigmas, "ve")
    plain = euler_sample(PlanDenoiser(GuidancePlan(), mixture, 0, 3.0, sigmas), noise, sigmas, "ve")
    towards_negative = (mixture.means[1] - mixture.means[0]).flatten()
    along_positive = mixture.means[0].flatten() / mixture.means[0].flatten().norm()
    towards_negative = towards_negative - (towards_negative @ along_positive) * along_positive
    assert float(guided.flatten(1).mean(0) @ towards_negative) < float(plain.flatten(1).mean(0) @ towards_negative)
    assert den.calls["branches"] == len(sigmas) - 1  # the negative is evaluated at every step


@pytest.mark.parametrize("batch", [1, 3])
def test_perp_neg_equals_core_perpneg_formula(batch):
    """ComfyUI core's ``perp_neg`` (comfy_extras/nodes_perpneg.py), written out: its projection sums over the
    whole batch, so per sample it is core's formula applied to each sample alone."""
    def core(x, pos, neg, nocond, neg_scale, cond_scale):
        p, n = pos - nocond, neg - nocond
        perp = n - ((torch.mul(n, p).sum()) / (torch.norm(p) ** 2)) * p
        return nocond + cond_scale * (p - perp * neg_scale)

    x, cond, uncond = random_triplet((batch, 4, 8, 8), seed=2)
    negative = uncond + 0.7 * torch.randn(uncond.shape, generator=torch.Generator().manual_seed(5))
    inp = step_inputs(x, cond, uncond, cond_scale=7.5, branches={NEGATIVE.name: negative})
    ours = run(GuidancePlan.of(PerpNeg(NEGATIVE, neg_scale=0.8)), inp)
    expected = torch.cat([core(x[i:i + 1], cond[i:i + 1], negative[i:i + 1], uncond[i:i + 1], 0.8, 7.5)
                          for i in range(batch)])
    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.allclose(perp_neg_step(cond, uncond, negative, 7.5, 0.8), expected, atol=1e-5)


def test_perp_neg_stacks_with_cfg_zero_star_apg_and_a_perturbation_term():
    x, cond, uncond = random_triplet((2, 4, 8, 8), seed=4)
    g = torch.Generator().manual_seed(6)
    negative = uncond + torch.randn(uncond.shape, generator=g)
    perturbed = cond + 0.3 * torch.randn(cond.shape, generator=g)
    pag = ExtraGuidance(Branch("PAG"), 2.0, label="PAG")
    inp = step_inputs(x, cond, uncond, sigma=2.0, cond_scale=5.0, branches={NEGATIVE.name: negative, "PAG": perturbed})
    perp = PerpNeg(NEGATIVE)
    term = -5.0 * perpendicular_negative(cond, uncond, negative)
    for other in (CFGZeroStar(zero_init_steps=0), APG(eta=0.0, norm_threshold=0.0, momentum=-0.5), pag):
        alone = run(GuidancePlan.of(other), inp)
        both = run(GuidancePlan.of(other, perp), inp)
        assert not torch.allclose(both, alone)  # Perp-Neg acts on top of the other method
        assert torch.allclose(both, alone + term, atol=1e-5)  # and leaves the other method's part unchanged


@pytest.mark.parametrize("shape", SHAPES)
def test_perp_neg_batch_is_per_sample_and_5d(shape):
    x, cond, uncond = random_triplet(shape, seed=7)
    negative = uncond + torch.randn(shape, generator=torch.Generator().manual_seed(8))
    plan = GuidancePlan.of(PerpNeg(NEGATIVE))
    whole = run(plan, step_inputs(x, cond, uncond, branches={NEGATIVE.name: negative}))
    singles = torch.cat([run(plan, step_inputs(x[i:i + 1], cond[i:i + 1], uncond[i:i + 1],
                                               branches={NEGATIVE.name: negative[i:i + 1]}))
                         for i in range(shape[0])])
    assert torch.allclose(whole, singles, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perp_neg_keeps_the_dtype(dtype):
    x, cond, uncond = random_triplet((2, 4, 8, 8), seed=9, dtype=dtype)
    out = run(GuidancePlan.of(PerpNeg(NEGATIVE)), step_inputs(x, cond, uncond, branches={NEGATIVE.name: uncond * 0.5}))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_perp_neg_cfg_one_and_bad_settings():
    plan = GuidancePlan.of(PerpNeg(NEGATIVE))
    assert plan.needs_uncond_at_cfg_one  # acts at cfg 1 (as core) and needs the uncond there
    x, cond, uncond = random_triplet((1, 4, 8, 8), seed=10)
    negative = uncond + 1.0
    out = run(plan, step_inputs(x, cond, uncond, cond_scale=1.0, branches={NEGATIVE.name: negative}))
    assert torch.allclose(out, cond - perpendicular_negative(cond, uncond, negative), atol=1e-5)
    with pytest.raises(PlanError, match="Perp-Neg"):
        GuidancePlan.of(PerpNeg(NEGATIVE, neg_scale=-1.0))
    with pytest.raises(PlanError, match="already has Perp-Neg"):
        GuidancePlan.of(PerpNeg(NEGATIVE), PerpNeg(NEGATIVE))
    with pytest.raises(KeyError, match="Perp-Neg"):
        run(plan, step_inputs(x, cond, uncond))  # the negative's prediction is missing


# ------------------------------------------------------------------------------------------------
# the posterior kernel (FBG and DNG)
# ------------------------------------------------------------------------------------------------

def test_kernel_is_the_official_edm_kernel_on_eps_models_and_finite_at_flow_sigma_one():
    t, s = 3.0, 1.7
    keep, weight, variance = kernel(t, s, "ve")
    assert keep == pytest.approx(s ** 2 / t ** 2)
    assert weight == pytest.approx((t ** 2 - s ** 2) / t ** 2)
    assert variance == pytest.approx((t ** 2 - s ** 2) * s ** 2 / t ** 2)
    keep, weight, variance = kernel(1.0, 0.8, "flow")
    assert (keep, weight, variance) == pytest.approx((0.0, 0.2, 0.64))


def test_kernel_is_the_true_posterior_of_the_mixture_step(mixture):
    """With x_s drawn from q(x_s | x_t, x0) of the flow noising, the kernel mean is E[x_s | x_t, x0]."""
    g = torch.Generator().manual_seed(12)
    x0 = mixture.sample(0, 20000, g).flatten(1)[:, :1]
    t, s = 0.7, 0.4
    noise_t = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # x_s = (1 − s)·x0 + s·n_s, x_t = (1 − t)·x0 + t·n_t with n_t built from n_s (a Markov forward step)
    noise_s = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_s = (1 - s) * x0 + s * noise_s
    ratio = (1 - t) / (1 - s)
    x_t = ratio * x_s + math.sqrt(t ** 2 - ratio ** 2 * s ** 2) * noise_t
    keep, weight, variance = kernel(t, s, "flow")
    residual = x_s - keep * x_t - weight * x0
    assert abs(float(residual.mean())) < 0.02
    assert float(residual.var()) == pytest.approx(variance, rel=0.05)


# ------------------------------------------------------------------------------------------------
# FBG
# ------------------------------------------------------------------------------------------------

def official_update_log_posterior(prev, x_cur, x_next, t_cur, t_next, uncond, cond, temp, offset, minimal):
    """FelixKoulischer/FBG_using_edm2 generate_images_FBG.py ``update_log_posterior``, written out."""
    sigma_square_tilde = (t_cur ** 2 - t_next ** 2) * t_next ** 2 / t_cur ** 2
    mean_u = t_next ** 2 / t_cur ** 2 * x_cur + (t_cur ** 2 - t_next ** 2) / t_cur ** 2 * uncond
    mean_c = t_next ** 2 / t_cur ** 2 * x_cur + (t_cur ** 2 - t_next ** 2) / t_cur ** 2 * cond
    diff = ((x_next - mean_c) ** 2).sum(dim=[1, 2, 3]) - ((x_next - mean_u) ** 2).sum(dim=[1, 2, 3])
    return torch.clamp(prev - temp / (2 * sigma_square_tilde) * diff + offset, min=minimal, max=3.0)


def edm_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    steps = [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
             for i in range(n)]
    return steps + [0.0]


def test_fbg_offset_and_temperature_are_the_official_derivation():
    n, pi, t0, t1 = 32, 0.95, 0.5, 0.4
    sigmas = edm_sigmas(n)
    delta = 1 / ((1 - t0) * n) * math.log((1 - pi) * 3.0 / 2.0)
    assert offset_from_t0(n, pi, t0) == pytest.approx(delta)
    tilde = [0.0] * n
    for i in range(n - 1):
        tilde[n - i - 1] = (sigmas[i] ** 2 - sigmas[i + 1] ** 2) * sigmas[i + 1] ** 2 / sigmas[i] ** 2
    assert transition_variances(sigmas, "ve") == pytest.approx(tilde)
    lower = int(math.floor(t1 * n))
    a = t1 * n - lower
    expected = abs(2 * ((1 - a) * tilde[lower] + a * tilde[lower + 1]) / 10.0 * delta)
    assert temperature_from_t1(tilde, delta, t1) == pytest.approx(expected)


def test_fbg_weights_follow_the_official_update_step_by_step():
    n, pi, max_scale = 12, 0.9, 10.0
    sigmas = edm_sigmas(n, sigma_max=20.0)
    method = FeedbackGuidance(pi=pi, max_scale=max_scale)
    plan, state = GuidancePlan.of(method), GuidanceState()
    convention = percent_convention()
    g = torch.Generator().manual_seed(13)
    x = torch.randn((3, 4, 8, 8), generator=g) * sigmas[0]
    log_posterior = torch.zeros(3)
    delta = offset_from_t0(n, pi, 0.5)
    temp = temperature_from_t1(transition_variances(sigmas, "ve"), delta, 0.4)
    minimal = math.log((1 - pi) * max_scale / (max_scale - 1))
    previous = None
    for i in range(n):
        cond = x * 0.3 + torch.randn(x.shape, generator=g) * 0.2
        uncond = cond + torch.randn(x.shape, generator=g) * 0.3
        if previous is not None:
            log_posterior = official_update_log_posterior(log_posterior, previous[0], x, previous[1], sigmas[i],
                                                           previous[3], previous[2], temp, delta, minimal)
        inp = StepInputs(x=x, sigma=torch.full((3,), sigmas[i]), cond_scale=4.0,
                         position=step_position(sigmas, sigmas[i], convention), parameterization="ve",
                         cond=cond, uncond=uncond)
        guided = run(plan, inp, state)
        scale = fbg_scale(log_posterior, pi).reshape(-1, 1, 1, 1)
        assert torch.allclose(guided, uncond + scale * (cond - uncond), atol=1e-4, rtol=1e-4), f"step {i}"
        previous = (x, sigmas[i], cond, uncond)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - guided) / sigmas[i]
    assert float((log_posterior - 0.0).abs().min()) > 0.1  # the posterior moved away from its start


@pytest.mark.parametrize("parameterization,sigmas", [("ve", karras_sigmas(30)), ("flow", flow_sigmas(30))])
def test_fbg_raises_adherence_with_a_bounded_per_sample_weight(mixture, parameterization, sigmas):
    method = FeedbackGuidance(pi=0.5, max_scale=8.0)
    noise = torch.randn((256,) + SHAPE, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    den = PlanDenoiser(GuidancePlan.of(method), mixture, 0, 1.0, sigmas, parameterization)
    guided = euler_sample(den, noise, sigmas, parameterization)
    plain = euler_sample(PlanDenoiser(GuidancePlan(), mixture, 0, 1.0, sigmas, parameterization), noise, sigmas,
                         parameterization)
    assert fraction_of_class(mixture, guided, 0) > fraction_of_class(mixture, plain, 0) + 0.05
    weights = fbg_scale(den.state.method_state["fbg"].log_posterior, 0.5)
    assert float(weights.max()) <= 8.0 + 1e-4 and float(weights.min()) >= 1.0
    assert float(weights.std()) > 0  # one weight per sample, from its own trajectory


def test_fbg_batch_equals_single_runs_and_hybrid_adds_cfg(mixture):
    sigmas = karras_sigmas(12)
    noise = torch.randn((4,) + SHAPE, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    plan = GuidancePlan.of(FeedbackGuidance(pi=0.5))
    batch = euler_sample(PlanDenoiser(plan, mixture, 0, 3.0, sigmas), noise, sigmas, "ve")
    singles = torch.cat([euler_sample(PlanDenoiser(plan, mixture, 0, 3.0, sigmas), noise[i:i + 1], sigmas, "ve")
                         for i in range(4)])
    assert torch.allclose(batch, singles, atol=1e-10)
    x, cond, uncond = random_triplet((2, 4, 8, 8), seed=16)
    position = step_position(sigmas, sigmas[0], percent_convention())
    inp = StepInputs(x=x, sigma=torch.full((2,), sigmas[0]), cond_scale=4.0, position=position,
                     parameterization="ve", cond=cond, uncond=uncond)
    pure = run(GuidancePlan.of(FeedbackGuidance(pi=0.5)), inp)
    hybrid = run(GuidancePlan.of(FeedbackGuidance(pi=0.5, mode="hybrid")), inp)
    assert torch.allclose(pure, uncond + 2.0 * (cond - uncond), atol=1e-5)  # λ = 1/π at L = 0
    assert torch.allclose(hybrid, uncond + 5.0 * (cond - uncond), atol=1e-5)  # λ + (cfg − 1)


def test_fbg_declarations_and_bad_settings():
    plan = GuidancePlan.of(FeedbackGuidance())
    assert plan.needs_uncond_at_cfg_one
    assert plan.cfg_notes(5.0) and not GuidancePlan.of(FeedbackGuidance(mode="hybrid")).cfg_notes(5.0)
    for bad in (dict(pi=1.0), dict(max_scale=1.0), dict(mode="cfg"), dict(t0=1.0), dict(temperature=-1.0)):
        with pytest.raises(PlanError, match="FBG"):
            GuidancePlan.of(FeedbackGuidance(**bad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fbg_keeps_the_dtype_on_5d(dtype):
    sigmas = karras_sigmas(6)
    x, cond, uncond = random_triplet((2, 4, 3, 8, 8), seed=17, dtype=dtype)
    inp = StepInputs(x=x, sigma=torch.full((2,), sigmas[0]), cond_scale=4.0,
                     position=step_position(sigmas, sigmas[0], percent_convention()), parameterization="ve",
                     cond=cond, uncond=uncond)
    out = run(GuidancePlan.of(FeedbackGuidance()), inp)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


# ------------------------------------------------------------------------------------------------
# DNG
# ------------------------------------------------------------------------------------------------

def dng_sample(mixture, plan, noise, sigmas, negative_label):
    """Unconditional sampling (C = U = the mixture's uncond, as DNG's setting) with the negative class's
    denoiser as the negative branch; returns the samples and the run state."""
    state = GuidanceState()
    convention = percent_convention()

    def denoise(x, sigma, _step):
        s = float(sigma.reshape(-1)[0])
        uncond = mixture.denoise_uncond(x, sigma)
        negative = mixture.denoise_cond(x, sigma, negative_label)
        inp = StepInputs(x=x, sigma=sigma, cond_scale=1.0, position=step_position(sigmas, s, convention),
                         parameterization="ve", cond=uncond, uncond=uncond, branches={DNG_NEGATIVE.name: negative})
        return combine(plan, inp, state)[0]

    return euler_sample(denoise, noise, sigmas, "ve"), state


def test_dng_removes_the_negative_class_and_acts_per_sample(mixture):
    sigmas = karras_sigmas(40)
    noise = torch.randn((600,) + SHAPE, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    plan = GuidancePlan.of(DynamicNegativeGuidance(DNG_NEGATIVE, scale=5.0, prior=0.2, temperature=1.0,
                                                   offset=0.0, p_max=0.95))
    guided, state = dng_sample(mixture, plan, noise, sigmas, 1)
    plain, _ = dng_sample(mixture, GuidancePlan(), noise, sigmas, 1)
    before, after = fraction_of_class(mixture, plain, 1), fraction_of_class(mixture, guided, 1)
    assert before > 0.2 and after < 0.5 * before
    posterior = state.method_state["dng"].posterior
    labels = mixture.classify(plain)
    # the posterior is higher on the samples that were heading to the negative class than on the others
    assert float(posterior[labels == 1].mean()) > 1.5 * float(posterior[labels != 1].mean())


def official_compute_posterior(p_prev, x_next, x_cur, uncond, bad, t_cur, t_next, temp, offset, p_min, p_max):
    """The official ``compute_posterior_DNG`` update with the (EDM-form) kernel of the pack's samplers."""
    variance = (t_cur ** 2 - t_next ** 2) * t_next ** 2 / t_cur ** 2
    mean = t_next ** 2 / t_cur ** 2 * x_cur + (t_cur ** 2 - t_next ** 2) / t_cur ** 2 * uncond
    bad_mean = t_next ** 2 / t_cur ** 2 * x_cur + (t_cur ** 2 - t_next ** 2) / t_cur ** 2 * bad
    diff = ((x_next - bad_mean).flatten(1) ** 2).sum(1) - ((x_next - mean).flatten(1) ** 2).sum(1)
    return torch.clamp(p_prev * torch.exp(1 / (2 * variance) * (-temp * diff + offset)), min=p_min, max=p_max)


def test_dng_follows_the_official_update_and_weight():
    sigmas = karras_sigmas(8)
    method = DynamicNegativeGuidance(DNG_NEGATIVE, scale=3.0, prior=0.05, temperature=0.2, offset=2e-4, p_max=0.8)
    plan, state = GuidancePlan.of(method), GuidanceState()
    convention = percent_convention()
    g = torch.Generator().manual_seed(19)
    x = torch.randn((2, 4, 8, 8), generator=g) * sigmas[0]
    p = torch.full((2,), 0.05)
    previous = None
    for i in range(len(sigmas) - 1):
        uncond = x * 0.2 + 0.1 * torch.randn(x.shape, generator=g)
        negative = uncond + 0.3 * torch.randn(x.shape, generator=g)
        if previous is not None:
            p = official_compute_posterior(p, x, previous[0], previous[2], previous[3], previous[1], sigmas[i], 0.2,
                                           2e-4, 1e-6, 0.8)
        inp = StepInputs(x=x, sigma=torch.full((2,), sigmas[i]), cond_scale=1.0,
                         position=step_position(sigmas, sigmas[i], convention), parameterization="ve",
                         cond=uncond, uncond=uncond, branches={DNG_NEGATIVE.name: negative})
        guided = run(plan, inp, state)
        weight = (3.0 * p / (1 - p)).reshape(-1, 1, 1, 1)
        assert torch.allclose(guided, uncond - weight * (negative - uncond), atol=1e-4, rtol=1e-4), f"step {i}"
        previous = (x, sigmas[i], uncond, negative)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - guided) / sigmas[i]


def test_dng_batch_5d_declarations_and_bad_settings():
    plan = GuidancePlan.of(DynamicNegativeGuidance(DNG_NEGATIVE))
    assert plan.needs_uncond_at_cfg_one
    x, cond, uncond = random_triplet((2, 4, 3, 8, 8), seed=20, dtype=torch.bfloat16)
    out = run(plan, step_inputs(x, cond, uncond, branches={DNG_NEGATIVE.name: uncond + 1}))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    for bad in (dict(scale=-1.0), dict(prior=0.9), dict(p_max=1.0), dict(temperature=-0.1)):
        with pytest.raises(PlanError, match="DNG"):
            GuidancePlan.of(DynamicNegativeGuidance(DNG_NEGATIVE, **bad))


# ------------------------------------------------------------------------------------------------
# CADS
# ------------------------------------------------------------------------------------------------

def test_cads_annealing_schedule_and_condition():
    assert [annealing(t, 0.6, 0.9) for t in (0.0, 0.6, 0.75, 0.9, 1.0)] == pytest.approx([1, 1, 0.5, 0, 0])
    g = torch.Generator().manual_seed(21)
    y = torch.randn(2, 7, 16, generator=g) * 3 + 1
    noise = torch.randn(7, 16, generator=g)
    assert torch.allclose(anneal_condition(y, 1.0, noise, 0.25, 1.0), y, atol=1e-5)  # γ = 1: the condition itself
    pure = anneal_condition(y, 0.0, noise, 0.25, 1.0)  # γ = 0: noise with the condition's statistics
    assert torch.allclose(pure.mean(dim=(1, 2)), y.mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(pure.std(dim=(1, 2)), y.std(dim=(1, 2)), atol=1e-4)
    raw = anneal_condition(y, 0.3, noise, 0.25, 0.0)  # ψ = 0: the noised condition without rescaling
    assert torch.allclose(raw, math.sqrt(0.3) * y + 0.25 * math.sqrt(0.7) * noise)
    method = CADS()
    assert method.AT_CFG_ONE is CfgOne.ACTS
    assert not method.acts_at(0.5) and method.acts_at(0.05)  # late in the run the condition is left alone
    for bad in (dict(tau1=0.9, tau2=0.6), dict(noise_scale=-1.0), dict(psi=2.0)):
        with pytest.raises(PlanError, match="CADS"):
            GuidancePlan.of(CADS(**bad))


def test_cads_equals_the_reference_add_noise_on_one_sample():
    """v0xie/sd-webui-cads ``add_noise`` (statistics over the whole tensor, i.e. one sample here), written out."""
    def reference(y, gamma, noise_scale, psi, noise):
        y_mean, y_std = torch.mean(y), torch.std(y)
        y = math.sqrt(gamma) * y + noise_scale * math.sqrt(1 - gamma) * noise
        scaled = (y - torch.mean(y)) / torch.std(y) * y_std + y_mean
        return psi * scaled + (1 - psi) * y

    g = torch.Generator().manual_seed(22)
    y, noise = torch.randn(1, 77, 32, generator=g), torch.randn(77, 32, generator=g)
    for gamma, psi in ((0.4, 1.0), (0.0, 0.5), (0.9, 0.2)):
        assert torch.allclose(anneal_condition(y, gamma, noise, 0.25, psi), reference(y, gamma, 0.25, psi, noise),
                              atol=1e-5)


def test_cads_gives_more_diverse_samples_at_high_cfg_on_the_mixture(mixture):
    """The condition is the class mean (an embedding the exact conditional denoiser reads): CADS noises it early
    in the run (one draw per sample and step, as the paper); at a high cfg the samples spread more than with CFG
    and stay in their class."""
    sigmas = karras_sigmas(30)
    convention = percent_convention()
    method = CADS()
    label = 0

    def conditional(x, sigma, embedding):
        b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return embedding + mixture.std ** 2 / (mixture.std ** 2 + b ** 2) * (x - embedding)

    def noise_of(sample, step):
        return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7919 * sample + step), dtype=torch.float64)

    def sample(cads):
        def denoise(x, sigma, step):
            progress = step_position(sigmas, float(sigma.reshape(-1)[0]), convention).progress
            embedding = mixture.means[label][None].expand_as(x)
            if cads:
                embedding = torch.cat([method.transform_condition(embedding[i:i + 1], progress, noise_of(i, step))
                                       for i in range(x.shape[0])])
            return cfg_reference(conditional(x, sigma, embedding), mixture.denoise_uncond(x, sigma), 15.0)
        noise = torch.randn((256,) + SHAPE, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
        return euler_sample(denoise, noise, sigmas, "ve")

    plain, annealed = sample(False), sample(True)

    def spread(samples):
        return float(samples.flatten(1).std(0).mean())

    assert spread(annealed) > spread(plain) + 0.01
    assert fraction_of_class(mixture, annealed, label) > 0.95


# ------------------------------------------------------------------------------------------------
# CFG-Rejection
# ------------------------------------------------------------------------------------------------

def test_cfg_rejection_score_and_weakest():
    x, cond, uncond = random_triplet((4, 4, 8, 8), seed=24)
    sigma = torch.full((4,), 2.0)
    expected = ((uncond - cond) / 2.0).flatten(1).square().sum(1)
    assert torch.allclose(score_increment(cond, uncond, sigma), expected)
    assert weakest(torch.tensor([3.0, 1.0, 2.0, 5.0]), 0.5) == [1, 2]
    assert weakest(torch.tensor([3.0]), 0.9) == []  # a batch of one keeps its sample
    assert weakest(torch.tensor([3.0, 1.0]), 0.95) == [1]  # at least one sample is kept


def test_cfg_rejection_keeps_the_samples_that_end_in_high_density(mixture):
    """The paper's finding on the exact mixture: at cfg > 1 the samples with the highest early ASD end at a higher
    density of p(x0 | c) than the ones CFG-Rejection names weakest."""
    sigmas = karras_sigmas(30)
    noise = torch.randn((512,) + SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    den = PlanDenoiser(GuidancePlan.of(CFGRejection(reject_at=0.2, reject_fraction=0.5)), mixture, 0, 4.0, sigmas)
    samples = euler_sample(den, noise, sigmas, "ve")
    tracked = den.state.method_state["cfg_rejection"]
    assert tracked.decided and len(tracked.rejected) == 256
    density = mixture.log_likelihoods(samples, torch.full((512,), 1e-9, dtype=torch.float64))[:, 0]
    rejected = torch.zeros(512, dtype=torch.bool)
    rejected[list(tracked.rejected)] = True
    assert float(density[~rejected].mean()) > float(density[rejected].mean()) + 0.5
    assert "CFG-Rejection" in GuidancePlan.of(CFGRejection()).step_notes(den.state, 4.0)[0][1]


def test_cfg_rejection_replace_makes_the_weakest_follow_the_strongest(mixture):
    sigmas = karras_sigmas(20)
    noise = torch.randn((6,) + SHAPE, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    report = PlanDenoiser(GuidancePlan.of(CFGRejection(mode="report")), mixture, 0, 3.0, sigmas)
    reported = euler_sample(report, noise, sigmas, "ve")
    assert torch.allclose(reported, euler_sample(PlanDenoiser(GuidancePlan(), mixture, 0, 3.0, sigmas), noise,
                                                 sigmas, "ve"))  # report only: the samples are unchanged
    den = PlanDenoiser(GuidancePlan.of(CFGRejection(mode="replace")), mixture, 0, 3.0, sigmas)
    samples = euler_sample(den, noise, sigmas, "ve")
    tracked = den.state.method_state["cfg_rejection"]
    assert len(tracked.rejected) == 3 and tracked.strongest not in tracked.rejected
    for row in tracked.rejected:
        assert torch.allclose(samples[row], samples[tracked.strongest], atol=1e-6)
    kept = [i for i in range(6) if i not in tracked.rejected]
    assert torch.allclose(samples[kept], reported[kept])  # the kept samples are untouched
    # batch-coupled by design: the same sample alone is never replaced
    alone = euler_sample(PlanDenoiser(GuidancePlan.of(CFGRejection(mode="replace")), mixture, 0, 3.0, sigmas),
                         noise[tracked.rejected[0]:tracked.rejected[0] + 1], sigmas, "ve")
    assert torch.allclose(alone[0], reported[tracked.rejected[0]])


def test_cfg_rejection_declarations_and_bad_settings():
    plan = GuidancePlan.of(CFGRejection())
    assert plan.inactive_at_cfg_one(False) == ["CFG-Rejection"]  # no uncond at cfg 1: nothing to score
    for bad in (dict(reject_at=0.0), dict(reject_fraction=1.0), dict(mode="drop")):
        with pytest.raises(PlanError, match="CFG-Rejection"):
            GuidancePlan.of(CFGRejection(**bad))
    x, cond, uncond = random_triplet((2, 4, 3, 8, 8), seed=26, dtype=torch.float16)
    assert run(plan, step_inputs(x, cond, uncond)).dtype == torch.float16
