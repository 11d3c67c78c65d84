"""Adaptive Guidance and LinearAG on exact Gaussian-mixture denoisers (guiders/adaptive.py)."""

import pytest
import torch

from guidance_kit.guiders.adaptive import (
    AdaptiveState,
    LinearFit,
    cosine_per_sample,
    denoised_from_noise,
    estimate_uncond,
    guidance_cosine,
    model_output,
    noise_prediction,
    record_uncond,
)
from guidance_kit.guiders.combine import GuidanceState, after_evaluation, combine, needs
from guidance_kit.guiders.methods.adaptive_guidance import AdaptiveGuidance
from guidance_kit.guiders.methods.extra_guidance import ExtraGuidance
from guidance_kit.guiders.plan import Branch, GuidancePlan, PlanError
from guidance_kit.guiders.progress import percent_of_sigma

from .gmm import GaussianMixture, flow_sigmas, karras_sigmas
from .helpers import PlanDenoiser, percent_convention, position_at, sample_plan, step_inputs

SHAPE = (2, 8, 8)


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(7)
    directions = torch.randn((3,) + SHAPE, generator=g, dtype=torch.float64)
    directions = directions / directions.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    return GaussianMixture(1.1 * directions, std=1.0)


def adaptive_plan(**kwargs) -> GuidancePlan:
    return GuidancePlan.of(AdaptiveGuidance(**kwargs))


def test_cosine_is_per_sample_and_scale_free():
    a = torch.randn(3, 4, 5, 5)
    assert torch.allclose(cosine_per_sample(a, 7 * a), torch.ones(3), atol=1e-6)
    assert torch.allclose(cosine_per_sample(a, -a), -torch.ones(3), atol=1e-6)
    assert torch.equal(cosine_per_sample(a, torch.zeros_like(a)), torch.zeros(3))
    b = a.clone()
    b[1] = torch.randn(4, 5, 5)
    c = cosine_per_sample(a, b)
    assert c[0] == pytest.approx(1.0, abs=1e-6) and c[1] < 0.9


def test_criterion_is_on_noise_predictions_not_on_denoised():
    """C and U share the image content: their own cosine is ≈1 where the ε cosine is not."""
    g = torch.Generator().manual_seed(0)
    content, noise, direction = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    x = 5 * content + noise  # σ = 1
    cond, uncond = 5 * content + direction, 5 * content - direction
    assert float(cosine_per_sample(cond, uncond)) > 0.9
    assert float(guidance_cosine(x, cond, uncond, 1.0)) < 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    x, cond = torch.randn(2, 4, 8, 8).to(dtype), torch.randn(2, 4, 8, 8).to(dtype)
    gamma = guidance_cosine(x, cond, cond, torch.tensor([2.0, 3.0]))
    assert gamma.dtype == torch.float32 and torch.allclose(gamma, torch.ones(2), atol=1e-3)


def test_settings_are_validated():
    for bad in (dict(threshold=2.0), dict(scope="everything"), dict(start_percent=1.5),
                dict(linear=True, calibration_steps=1), dict(linear=True, scope="branches only"),
                dict(linear=True, refresh_every=0)):
        with pytest.raises(PlanError, match="Adaptive Guidance"):
            AdaptiveGuidance(**bad).validate()
    with pytest.raises(PlanError, match="already has"):
        adaptive_plan().with_method(AdaptiveGuidance())


@pytest.mark.parametrize("parameterization,sigmas", [("ve", karras_sigmas(20)), ("flow", flow_sigmas(20))])
def test_threshold_above_one_is_cfg_exactly(mixture, parameterization, sigmas):
    ref, ref_den = sample_plan(GuidancePlan(), mixture, 1, 4.0, sigmas, n=64, parameterization=parameterization)
    out, den = sample_plan(adaptive_plan(threshold=1.01, start_percent=0.0, linear=False), mixture, 1, 4.0, sigmas,
                           n=64, parameterization=parameterization)
    assert torch.equal(out, ref)
    assert den.calls == ref_den.calls == {"cond": 20, "uncond": 20, "branches": 0}


def test_threshold_minus_one_is_conditional_only_from_the_first_step(mixture):
    sigmas = karras_sigmas(12)
    cond_only, _ = sample_plan(GuidancePlan(), mixture, 2, 1.0, sigmas, n=32)
    out, den = sample_plan(adaptive_plan(threshold=-1.0), mixture, 2, 6.0, sigmas, n=32)
    assert den.calls["uncond"] == 0 and den.calls["cond"] == 12
    assert torch.allclose(out, cond_only)


def test_switch_is_one_way_and_the_uncond_count_is_the_switch_step(mixture):
    """A denoiser whose guidance direction vanishes after step 5 and comes back at step 9."""
    sigmas = karras_sigmas(14)
    plan = adaptive_plan(threshold=0.999999, start_percent=0.0, linear=False)
    den = PlanDenoiser(plan, mixture, 0, 5.0, sigmas)
    base_uncond = den.gmm.denoise_uncond

    def uncond(x, sigma, parameterization="ve"):
        step = min(range(14), key=lambda i: abs(sigmas[i] - float(sigma.reshape(-1)[0])))
        if 5 <= step < 9:
            return den.gmm.denoise_cond(x, sigma, 0, parameterization)
        return base_uncond(x, sigma, parameterization)

    den.gmm = GaussianMixture(mixture.means, mixture.std)
    den.gmm.denoise_uncond = uncond
    x = torch.randn((4,) + SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sigmas[0]
    for i in range(14):
        sig = torch.full((4,), sigmas[i], dtype=torch.float64)
        guided = den(x, sig)
        if i > 5:
            assert torch.allclose(guided, den.gmm.denoise_cond(x, sig, 0), atol=1e-6)  # after the switch: D̂ = C
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - guided) / sigmas[i]
    assert den.state.adaptive.switched == {"uncond": 5}
    assert den.calls["uncond"] == 6  # evaluations 0..5 ran it, none after (not even when it diverges again)


def test_switch_point_on_the_mixture_follows_the_cosine(mixture):
    """The switch happens at the first evaluation past start_percent whose ε-cosine reaches γ̄."""
    sigmas = karras_sigmas(30)
    plan = adaptive_plan(threshold=0.999, start_percent=0.3, linear=False)
    out, den = sample_plan(plan, mixture, 1, 4.0, sigmas, n=128)
    switched_at = den.state.adaptive.switched["uncond"]
    assert den.calls["uncond"] == switched_at + 1
    # replay CFG to the same point: cosines before the switch (past the start) stay below γ̄
    x = torch.randn((128,) + SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    for i in range(switched_at + 1):
        sig = torch.full((128,), sigmas[i], dtype=torch.float64)
        cond, uncond = mixture.denoise_cond(x, sig, 1), mixture.denoise_uncond(x, sig)
        gamma = float(guidance_cosine(x, cond, uncond, sig).min())
        progress = percent_of_sigma(sigmas[i], percent_convention("ve"))
        if progress >= 0.3:
            assert (gamma >= 0.999) == (i == switched_at)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - (uncond + 4.0 * (cond - uncond))) / sigmas[i]


@pytest.mark.parametrize("parameterization,sigmas,saving", [("ve", karras_sigmas(30), 0.2),
                                                             ("flow", flow_sigmas(30), 0.2)])
def test_defaults_make_fewer_calls_at_quality_within_noise_of_cfg(mixture, parameterization, sigmas, saving):
    def quality(samples):
        accuracy = (mixture.classify(samples) == 1).double().mean().item()
        return accuracy, samples.flatten(1).norm(dim=1).mean().item()

    ref, _ = sample_plan(GuidancePlan(), mixture, 1, 4.0, sigmas, n=512, parameterization=parameterization)
    other_seed, _ = sample_plan(GuidancePlan(), mixture, 1, 4.0, sigmas, n=512, seed=1,
                                parameterization=parameterization)
    noise = abs(quality(ref)[1] - quality(other_seed)[1])
    plan = adaptive_plan()  # the defaults: LinearAG alone, a true uncond every other evaluation
    out, den = sample_plan(plan, mixture, 1, 4.0, sigmas, n=512, parameterization=parameterization)
    calls = den.calls["cond"] + den.calls["uncond"]
    assert calls <= (1 - saving) * 60  # fewer model passes than CFG's 60
    assert quality(out)[0] >= quality(ref)[0] - 0.01
    assert abs(quality(out)[1] - quality(ref)[1]) <= 2 * noise + 0.02


@pytest.mark.parametrize("parameterization,sigmas", [("ve", karras_sigmas(30)), ("flow", flow_sigmas(30))])
def test_linear_ag_estimate_error_is_small_after_calibration(mixture, parameterization, sigmas):
    """Error relative to the guidance direction ‖ε_c − ε_u‖ the estimate has to reproduce: small in the
    first half (where the paper replaces the uncond), bounded after it (where AG switches off anyway)."""
    state = AdaptiveState()
    x = torch.randn((64,) + SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x * sigmas[0] if parameterization == "ve" else x
    errors = []
    for i in range(29):
        sig = torch.full((64,), sigmas[i], dtype=torch.float64)
        cond = mixture.denoise_cond(x, sig, 1, parameterization)
        uncond = mixture.denoise_uncond(x, sig, parameterization)
        if i >= 3:
            estimate = estimate_uncond(state, x, sig, cond)
            f_u = model_output(x, uncond, sig)  # the regression's space: ε on eps models, the velocity on flow
            direction = model_output(x, cond, sig) - f_u
            error = model_output(x, estimate, sig) - f_u
            errors.append(float(error.norm() / direction.norm()))
        record_uncond(state, x, sig, cond, uncond, true_evaluation=True, fit=True)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - (uncond + 4.0 * (cond - uncond))) / sigmas[i]
    first_half = errors[:12]
    assert max(first_half) < 0.12, errors
    assert sum(errors) / len(errors) < 0.12, errors
    assert max(errors) < 0.4, errors


def test_linear_fit_recovers_exact_affine_coefficients_per_sample():
    g = torch.Generator().manual_seed(0)
    fit = LinearFit()
    truth = torch.tensor([[0.9, 0.7, -0.6], [1.1, 0.2, -0.3]], dtype=torch.float64)
    for _ in range(3):
        c, pu, pc = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
        coefficients = truth.float().reshape(2, 3, 1, 1, 1)
        fit.add(c, pu, pc, coefficients[:, 0] * c + coefficients[:, 1] * pu + coefficients[:, 2] * pc)
    assert torch.allclose(fit.coefficients(), truth, atol=1e-5)


def test_linear_ag_schedule_of_estimates(mixture):
    sigmas = karras_sigmas(20)
    plan = adaptive_plan(threshold=1.01, linear=True, calibration_steps=4, refresh_every=3)
    out, den = sample_plan(plan, mixture, 0, 3.0, sigmas, n=16)
    # 4 calibration evaluations, then true uncond on every 3rd: 16 remaining → 5 true + 11 estimated
    assert den.calls["uncond"] == 4 + 5 and den.calls.get("estimated") == 11
    assert torch.isfinite(out).all()


def test_extra_branches_stop_on_their_own_criterion():
    """A branch identical to the cond stops at once; the uncond (different) keeps running."""
    branch = Branch("same-as-cond")
    plan = GuidancePlan.of(AdaptiveGuidance(threshold=0.999, start_percent=0.0, linear=False)).with_extra(
        ExtraGuidance(branch, 2.0, label="test term"))
    state = GuidanceState()
    x = torch.randn(2, 4, 8, 8) * 3
    cond = torch.randn(2, 4, 8, 8)
    uncond = cond + torch.randn(2, 4, 8, 8)
    position = position_at(0.0, 10)
    need = needs(plan, position, 3.0, state)
    assert need.uncond and need.branches == (branch,)
    after_evaluation(plan, state, need, position, x, torch.full((2,), 3.0), cond, uncond, {branch.name: cond})
    need = needs(plan, position_at(1.0, 10), 2.0, state)
    assert need.uncond and need.branches == ()
    scoped = GuidancePlan.of(AdaptiveGuidance(threshold=0.999, start_percent=0.0, scope="uncond only",
                                                    linear=False))
    scoped = scoped.with_extra(ExtraGuidance(branch, 2.0, label="test term"))
    state = GuidanceState()
    need = needs(scoped, position, 3.0, state)
    after_evaluation(scoped, state, need, position, x, torch.full((2,), 3.0), cond, uncond, {branch.name: cond})
    assert needs(scoped, position_at(1.0, 10), 2.0, state).branches == (branch,)


def test_each_sample_switches_on_its_own_and_the_pass_stops_when_all_have():
    """Sample 0 converges at evaluation 0, sample 1 at evaluation 1: sample 0 is conditional-only from
    evaluation 1 on (its uncond row still computed), and the uncond pass stops after evaluation 1."""
    plan = adaptive_plan(threshold=0.99, start_percent=0.0, linear=False)
    state = GuidanceState()
    x = torch.randn(2, 4, 8, 8) * 3
    sigma = torch.full((2,), 3.0)
    cond = torch.randn(2, 4, 8, 8)
    uncond = cond.clone()
    uncond[1] += 3 * torch.randn(4, 8, 8)  # sample 1 still far from converged
    position = position_at(0.0, 10)
    need = needs(plan, position, 3.0, state)
    after_evaluation(plan, state, need, position, x, sigma, cond, uncond, {})
    assert state.adaptive.rows_off["uncond"].tolist() == [True, False]
    need = needs(plan, position_at(1.0, 10), 2.0, state)
    assert need.uncond  # sample 1 still needs it
    far = cond - 2 * torch.randn(2, 4, 8, 8)  # both far apart at evaluation 1 ...
    far[1] = cond[1]  # ... but sample 1 converges now
    after_evaluation(plan, state, need, position_at(1.0, 10), x, sigma, cond, far, {})
    guided, _ = combine(plan, step_inputs(x, cond, far, sigma=3.0, cond_scale=5.0, step=1), state)
    assert torch.allclose(guided[0], cond[0], atol=1e-6)  # sample 0: stopped at evaluation 0 → D̂ = C
    assert torch.allclose(guided[1], cond[1], atol=1e-6)  # sample 1: C = U here anyway
    assert state.adaptive.switched == {"uncond": 1}
    assert not needs(plan, position_at(2.0, 10), 2.0, state).uncond


@pytest.mark.parametrize("parameterization,sigmas", [("ve", karras_sigmas(24)), ("flow", flow_sigmas(24))])
@pytest.mark.parametrize("linear", [False, True])
def test_a_samples_result_does_not_depend_on_its_batch(mixture, parameterization, sigmas, linear):
    """Batch invariance: 16 samples in one batch equal the same noise sampled as batches of 4, 8 and 4."""
    plan = adaptive_plan(threshold=0.995, start_percent=0.3, linear=linear)
    noise = torch.randn((16,) + SHAPE, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def sample(rows):
        den = PlanDenoiser(plan, mixture, 1, 4.0, sigmas, parameterization)
        x = noise[rows] * sigmas[0] if parameterization == "ve" else noise[rows].clone()
        return euler_sample_from(den, x, sigmas), den

    whole, den = sample(slice(0, 16))
    parts = torch.cat([sample(slice(a, b))[0] for a, b in ((0, 4), (4, 12), (12, 16))])
    assert torch.allclose(whole, parts, atol=1e-9)
    rows_off = den.state.adaptive.rows_off["uncond"]
    assert bool(rows_off.any())  # some samples switched (so the check means something)


def euler_sample_from(den, x, sigmas):
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        guided = den(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        x = x + (s_next - s) * (x - guided) / s
    return x


def test_flow_noise_prediction_is_the_noise_of_x():
    """ComfyUI's flow convention x = (1 − σ)·x0 + σ·n: with D = x0, ε̂ = (x − (1 − σ)·D)/σ is n exactly (the
    velocity (x − D)/σ = n − x0 is not); on eps models x = x0 + σ·n and ε̂ = (x − D)/σ."""
    g = torch.Generator().manual_seed(2)
    x0, n = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    s = sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(noise_prediction((1 - s) * x0 + s * n, x0, sigma, "flow"), n, atol=1e-5)
    assert torch.allclose(noise_prediction(x0 + s * n, x0, sigma, "ve"), n, atol=1e-5)
    assert torch.allclose(denoised_from_noise((1 - s) * x0 + s * n, n, sigma, "flow"), x0, atol=1e-5)


def test_defaults_are_linear_ag_alone():
    settings = AdaptiveGuidance()
    assert settings.linear and settings.threshold > 1 and settings.threshold == AdaptiveGuidance.NO_SWITCH
    AdaptiveGuidance(scope="branches only", linear=False, threshold=0.99).validate()


def test_the_plan_reads_noise_predictions_for_the_sampled_model():
    plan = adaptive_plan()
    assert plan.get("adaptive").parameterization is None
    assert plan.for_model("flow").get("adaptive").parameterization == "flow"
    assert plan.for_model("ve").get("adaptive").parameterization == "ve"


def test_no_check_at_sigma_one_on_flow_models():
    """At σ = 1 a flow model's noise prediction is x for every D (cosine exactly 1): not a convergence signal."""
    plan = adaptive_plan(threshold=0.99, start_percent=0.0, linear=False).for_model("flow")
    state = GuidanceState()
    x, cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(guidance_cosine(x, cond, uncond, 1.0, "flow"), torch.ones(2))
    need = needs(plan, position_at(0.0, 10), 1.0, state)
    after_evaluation(plan, state, need, position_at(0.0, 10), x, torch.ones(2), cond, uncond, {})
    assert state.adaptive.rows_off == {} and needs(plan, position_at(1.0, 10), 0.9, state).uncond
