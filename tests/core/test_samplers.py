"""CFG++ DPM++ 2M/3M SDE and PCG (guiders/samplers.py) on exact Gaussian-mixture / Gaussian denoisers.

References here are written independently of the implementation: plain (non-CFG++) DPM-Solver++ SDE
steps from the exponential-integrator formulas, core's ``dpmpp_2m_cfg_pp`` update, the paper's CFG++
Euler rule, a conditional DDIM loop, and the closed-form γ-powered Gaussian.
"""

import math

import pytest
import torch

from guidance_kit.guiders import samplers as gs

from .gmm import GaussianMixture, flow_sigmas, karras_sigmas

SHAPE = (2, 4, 4)
LABEL = 1
HALF_LOG_SNR = {"ve": gs.ve_half_log_snr, "flow": gs.flow_half_log_snr}


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(3)
    means = torch.randn((3,) + SHAPE, generator=g, dtype=torch.float64)
    return GaussianMixture(means, std=0.7)


@pytest.fixture(scope="module")
def overlapping():
    """Classes that overlap: Bayes accuracy well below 1 for exact conditional samples."""
    g = torch.Generator().manual_seed(7)
    directions = torch.randn((3,) + SHAPE, generator=g, dtype=torch.float64)
    return GaussianMixture(1.1 * directions / directions.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1), std=1.0)


def sigmas_for(parameterization: str, n: int = 8) -> torch.Tensor:
    if parameterization == "ve":
        return torch.tensor(karras_sigmas(n), dtype=torch.float64)
    sigmas = torch.tensor(flow_sigmas(n), dtype=torch.float64)
    sigmas[0] = 1 - 1e-4  # as ComfyUI's offset_first_sigma_for_snr does for SDE samplers
    return sigmas


def start(parameterization: str, sigmas: torch.Tensor, n: int = 16, seed: int = 0, dtype=torch.float64):
    noise = torch.randn((n,) + SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = noise * sigmas[0] if parameterization == "ve" else noise
    return x.to(dtype)


class SeededNoise:
    """The same noise sequence for every run that draws in the same order."""

    def __init__(self, shape, seed: int = 11, dtype=torch.float64):
        self.generator = torch.Generator().manual_seed(seed)
        self.shape, self.dtype = shape, dtype
        self.calls = 0

    def __call__(self, *_):
        self.calls += 1
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float64).to(self.dtype)


def guided_denoiser(gmm, parameterization, lam, label=LABEL):
    """(x, σ) → (U + λ(C − U), U) on the mixture."""

    def denoise(x, sigma):
        cond = gmm.denoise_cond(x, sigma, label, parameterization)
        uncond = gmm.denoise_uncond(x, sigma, parameterization)
        return uncond + lam * (cond - uncond), uncond

    return denoise


def same_prediction(denoise_fn):
    def denoise(x, sigma):
        d = denoise_fn(x, sigma)
        return d, d

    return denoise


# ------------------------------------------------------------------------------------------------
# plain DPM-Solver++ SDE references (data prediction, λ = log(α/σ))
# ------------------------------------------------------------------------------------------------

def lambda_alpha(sigma, parameterization):
    s = float(sigma)
    if parameterization == "ve":
        return -math.log(s), 1.0
    return math.log((1 - s) / s), 1 - s


def plain_sde_step(x, d, sigma, sigma_next, parameterization, eta):
    """x' = (σ'/σ)e^{−ηh}·x + α'(1 − e^{−(1+η)h})·D (first-order part), also returning the step's constants."""
    lam, _ = lambda_alpha(sigma, parameterization)
    lam_next, alpha_next = lambda_alpha(sigma_next, parameterization)
    h = lam_next - lam
    x_new = float(sigma_next) / float(sigma) * math.exp(-eta * h) * x + alpha_next * (1 - math.exp(-(1 + eta) * h)) * d
    return x_new, h, alpha_next


def noise_term(noise, sigma_next, h, eta, s_noise):
    return noise() * (float(sigma_next) * math.sqrt(1 - math.exp(-2 * eta * h)) * s_noise)


def reference_2m_sde(denoise, x, sigmas, parameterization, noise, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    previous, previous_h = None, None
    for i in range(len(sigmas) - 1):
        d = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return d
        x, h, alpha_next = plain_sde_step(x, d, sigmas[i], sigmas[i + 1], parameterization, eta)
        if previous is not None:
            r = previous_h / h
            he = (1 + eta) * h
            if solver_type == "midpoint":
                x = x + 0.5 * alpha_next * (1 - math.exp(-he)) / r * (d - previous)
            else:
                x = x + alpha_next * (1 - (1 - math.exp(-he)) / he) / r * (d - previous)
        if eta > 0 and s_noise > 0:
            x = x + noise_term(noise, sigmas[i + 1], h, eta, s_noise)
        previous, previous_h = d, h
    return x


def reference_3m_sde(denoise, x, sigmas, parameterization, noise, eta=1.0, s_noise=1.0):
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        d = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return d
        x, h, alpha_next = plain_sde_step(x, d, sigmas[i], sigmas[i + 1], parameterization, eta)
        he = (1 + eta) * h
        phi_2 = 1 - (1 - math.exp(-he)) / he
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            first_0, first_1 = (d - d_1) / r0, (d_1 - d_2) / r1
            first = first_0 + (first_0 - first_1) * r0 / (r0 + r1)
            second = (first_0 - first_1) / (r0 + r1)
            x = x + alpha_next * phi_2 * first - alpha_next * (phi_2 / he - 0.5) * second
        elif h_1 is not None:
            x = x + alpha_next * phi_2 * (d - d_1) / (h_1 / h)
        if eta > 0 and s_noise > 0:
            x = x + noise_term(noise, sigmas[i + 1], h, eta, s_noise)
        d_1, d_2, h_1, h_2 = d, d_1, h, h_1
    return x


CFG_PP = {
    "2m_midpoint": (gs.sample_dpmpp_2m_sde_cfg_pp, dict(solver_type="midpoint"),
                    lambda *a, **k: reference_2m_sde(*a, solver_type="midpoint", **k)),
    "2m_heun": (gs.sample_dpmpp_2m_sde_cfg_pp, dict(solver_type="heun"),
                lambda *a, **k: reference_2m_sde(*a, solver_type="heun", **k)),
    "3m": (gs.sample_dpmpp_3m_sde_cfg_pp, {}, reference_3m_sde),
}


def run_cfg_pp(name, denoise, x, sigmas, parameterization, noise, eta=1.0, s_noise=1.0, **kwargs):
    fn, options, _ = CFG_PP[name]
    return fn(denoise, x, sigmas, half_log_snr=HALF_LOG_SNR[parameterization], noise_sampler=noise, eta=eta,
              s_noise=s_noise, **options, **kwargs)


# ------------------------------------------------------------------------------------------------
# CFG++ samplers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", ["ve", "flow"])
@pytest.mark.parametrize("name", list(CFG_PP))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_cfg_pp_with_no_guidance_difference_is_the_plain_sampler(mixture, parameterization, name, eta):
    sigmas = sigmas_for(parameterization)
    x = start(parameterization, sigmas)

    def cond(x, s):
        return mixture.denoise_cond(x, s, LABEL, parameterization)

    got = run_cfg_pp(name, same_prediction(cond), x, sigmas, parameterization, SeededNoise(x.shape), eta=eta)
    reference = CFG_PP[name][2](cond, x, sigmas, parameterization, SeededNoise(x.shape), eta=eta)
    assert torch.allclose(got, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("parameterization", ["ve", "flow"])
@pytest.mark.parametrize("name", list(CFG_PP))
def test_lambda_zero_follows_the_unconditional_trajectory(mixture, parameterization, name):
    sigmas = sigmas_for(parameterization)
    x = start(parameterization, sigmas)
    got = run_cfg_pp(name, guided_denoiser(mixture, parameterization, 0.0), x, sigmas, parameterization,
                     SeededNoise(x.shape))

    def uncond(x, s):
        return mixture.denoise_uncond(x, s, parameterization)

    reference = CFG_PP[name][2](uncond, x, sigmas, parameterization, SeededNoise(x.shape))
    assert torch.allclose(got, reference, rtol=1e-10, atol=1e-10)
    guided = run_cfg_pp(name, guided_denoiser(mixture, parameterization, 0.8), x, sigmas, parameterization,
                        SeededNoise(x.shape))
    assert (guided - reference).abs().max() > 1e-2  # λ > 0 does guide


@pytest.mark.parametrize("parameterization", ["ve", "flow"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("name", list(CFG_PP))
def test_first_step_is_the_unguided_step_plus_alpha_next_times_guidance(mixture, parameterization, eta, name):
    """A·(x + α(D_λ − U)) + B·D_λ = [A·x + B·U] + α'·(D_λ − U), α' = 1 − σ' on flow (A·α + B = α')."""
    sigmas = torch.tensor([0.8, 0.55], dtype=torch.float64) if parameterization == "flow" else \
        torch.tensor([3.0, 1.7], dtype=torch.float64)
    x = start(parameterization, sigmas)
    denoise = guided_denoiser(mixture, parameterization, 0.9)
    guided, uncond = denoise(x, sigmas[0])
    got = run_cfg_pp(name, denoise, x, sigmas, parameterization, SeededNoise(x.shape), eta=eta)
    unguided = CFG_PP[name][2](lambda *_: uncond, x, sigmas, parameterization, SeededNoise(x.shape), eta=eta)
    alpha_next = 1 - float(sigmas[1]) if parameterization == "flow" else 1.0
    assert torch.allclose(got, unguided + alpha_next * (guided - uncond), rtol=1e-10, atol=1e-10)
    if parameterization == "flow":  # the pitfall: omitting α (x − U instead of x − (1 − σ)U)
        assert (got - (unguided + (guided - uncond))).abs().max() > 1e-2


@pytest.mark.parametrize("parameterization", ["ve", "flow"])
def test_deterministic_first_order_step_is_the_paper_cfg_pp_euler_rule(mixture, parameterization):
    """η = 0, one step: x' = α'·D_λ + (σ'/σ)·(x − α·U) (official euler_cfg++ / core's sample_euler_cfg_pp)."""
    sigmas = torch.tensor([0.9, 0.6], dtype=torch.float64) if parameterization == "flow" else \
        torch.tensor([5.0, 2.5], dtype=torch.float64)
    x = start(parameterization, sigmas)
    denoise = guided_denoiser(mixture, parameterization, 0.7)
    guided, uncond = denoise(x, sigmas[0])
    s, s_next = float(sigmas[0]), float(sigmas[1])
    alpha, alpha_next = (1 - s, 1 - s_next) if parameterization == "flow" else (1.0, 1.0)
    paper = alpha_next * guided + s_next / s * (x - alpha * uncond)
    for name in CFG_PP:
        got = run_cfg_pp(name, denoise, x, sigmas, parameterization, SeededNoise(x.shape), eta=0.0)
        assert torch.allclose(got, paper, rtol=1e-10, atol=1e-10), name


def test_2m_sde_at_eta_zero_is_core_dpmpp_2m_cfg_pp_on_eps_models(mixture):
    """Core's update: x' = D_λ + e^{−h}(x − U) + (1 − e^{−h})/(2r)·(D_λ − U_prev); last step D_λ."""
    sigmas = sigmas_for("ve")
    x0 = start("ve", sigmas)
    denoise = guided_denoiser(mixture, "ve", 0.8)
    x, previous_uncond = x0.clone(), None
    for i in range(len(sigmas) - 1):
        guided, uncond = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = guided
            break
        h = math.log(float(sigmas[i]) / float(sigmas[i + 1]))
        correction = 0.0
        if previous_uncond is not None:
            r = math.log(float(sigmas[i - 1]) / float(sigmas[i])) / h
            correction = (1 - math.exp(-h)) / (2 * r) * (guided - previous_uncond)
        x = guided + math.exp(-h) * (x - uncond) + correction
        previous_uncond = uncond
    got = run_cfg_pp("2m_midpoint", denoise, x0, sigmas, "ve", SeededNoise(x0.shape), eta=0.0)
    assert torch.allclose(got, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("parameterization", ["ve", "flow"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_3m_starts_like_2m_heun(mixture, parameterization, eta):
    """3M's first two steps are first order then the 2M (heun-coefficient) step, also with CFG++."""
    sigmas = sigmas_for(parameterization)[:3]
    x = start(parameterization, sigmas)
    denoise = guided_denoiser(mixture, parameterization, 0.8)
    three = run_cfg_pp("3m", denoise, x, sigmas, parameterization, SeededNoise(x.shape), eta=eta)
    two = run_cfg_pp("2m_heun", denoise, x, sigmas, parameterization, SeededNoise(x.shape), eta=eta)
    assert torch.allclose(three, two, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(CFG_PP))
def test_cfg_pp_guidance_raises_class_adherence(mixture, name):
    sigmas = sigmas_for("ve", 12)
    x = start("ve", sigmas, n=256, seed=5)
    adherence = {}
    for lam in (0.0, 1.0):
        samples = run_cfg_pp(name, guided_denoiser(mixture, "ve", lam), x, sigmas, "ve", SeededNoise(x.shape))
        assert torch.isfinite(samples).all()
        adherence[lam] = (mixture.classify(samples) == LABEL).double().mean().item()
    assert adherence[1.0] > adherence[0.0] + 0.2


@pytest.mark.parametrize("name", list(CFG_PP))
def test_noise_sampler_use_callback_and_final_denoise(mixture, name):
    sigmas = sigmas_for("ve", 5)
    x = start("ve", sigmas)
    seen = []
    noise = SeededNoise(x.shape)
    denoise = guided_denoiser(mixture, "ve", 0.5)
    got = run_cfg_pp(name, denoise, x, sigmas, "ve", noise, callback=lambda d: seen.append((d["i"], d["denoised"])))
    assert [i for i, _ in seen] == list(range(5))
    assert noise.calls == 4  # every step but the final denoise
    assert torch.equal(got, seen[-1][1])  # σ' = 0: the output is D_λ
    silent = SeededNoise(x.shape)
    run_cfg_pp(name, denoise, x, sigmas, "ve", silent, eta=0.0)
    assert silent.calls == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CFG_PP))
def test_cfg_pp_half_precision(mixture, name, dtype):
    sigmas = sigmas_for("flow").float()
    x64 = start("flow", sigmas.double())
    denoise = guided_denoiser(mixture, "flow", 0.8)
    reference = run_cfg_pp(name, denoise, x64, sigmas.double(), "flow", SeededNoise(x64.shape))

    def low(x, s):
        g, u = denoise(x, s)
        return g.to(dtype), u.to(dtype)

    got = run_cfg_pp(name, low, x64.to(dtype), sigmas, "flow", SeededNoise(x64.shape, dtype=dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.double() - reference).abs().max() / reference.abs().max() < 3e-2


# ------------------------------------------------------------------------------------------------
# PCG
# ------------------------------------------------------------------------------------------------

class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.fn(x, sigma)


def pcg_denoisers(gmm, parameterization, gamma):
    cond = Counting(lambda x, s: gmm.denoise_cond(x, s, LABEL, parameterization))

    def guided_fn(x, s):
        c = gmm.denoise_cond(x, s, LABEL, parameterization)
        u = gmm.denoise_uncond(x, s, parameterization)
        return u + gamma * (c - u)

    return cond, Counting(guided_fn)


def run_pcg(cond, guided, x, sigmas, parameterization, corrector_steps, step_scale=0.5, seed=4, **kwargs):
    return gs.sample_pcg(cond, guided, x, sigmas, half_log_snr=HALF_LOG_SNR[parameterization],
                         langevin_noise=SeededNoise(x.shape, seed=seed, dtype=x.dtype), corrector_steps=corrector_steps,
                         step_scale=step_scale, **kwargs)


@pytest.mark.parametrize("parameterization", ["ve", "flow"])
def test_pcg_without_corrector_is_the_conditional_ddim_sampler(mixture, parameterization):
    sigmas = torch.tensor(karras_sigmas(8) if parameterization == "ve" else flow_sigmas(8), dtype=torch.float64)
    x0 = start(parameterization, sigmas)  # flow starts at σ = 1 exactly: PCG needs no offset
    cond, guided = pcg_denoisers(mixture, parameterization, 4.0)
    got = run_pcg(cond, guided, x0, sigmas, parameterization, corrector_steps=0)
    x = x0.clone()
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = mixture.denoise_cond(x, sigmas[i], LABEL, parameterization)
        x = x + (s_next - s) * (x - d) / s  # Euler = DDIM for VE and for flow
    assert torch.allclose(got, x, rtol=1e-9, atol=1e-9)
    assert cond.calls == 8 and guided.calls == 0


@pytest.mark.parametrize("corrector_steps", [1, 3])
def test_pcg_model_calls_one_cond_plus_k_guided_per_step(mixture, corrector_steps):
    sigmas = sigmas_for("ve", 6)
    cond, guided = pcg_denoisers(mixture, "ve", 3.0)
    out = run_pcg(cond, guided, start("ve", sigmas), sigmas, "ve", corrector_steps)
    assert torch.isfinite(out).all()
    assert cond.calls == 6
    assert guided.calls == corrector_steps * 5  # no corrector on the last step (σ' = 0)


def test_pcg_guidance_raises_adherence_and_corrector_noise_is_seeded(overlapping):
    sigmas = sigmas_for("ve", 10)
    x = start("ve", sigmas, n=512, seed=2)
    adherence = {}
    for gamma in (1.0, 4.0):
        cond, guided = pcg_denoisers(overlapping, "ve", gamma)
        samples = run_pcg(cond, guided, x, sigmas, "ve", corrector_steps=2, step_scale=0.2)
        assert torch.isfinite(samples).all()
        adherence[gamma] = (overlapping.classify(samples) == LABEL).double().mean().item()
    assert adherence[4.0] > adherence[1.0] + 0.1, adherence
    cond, guided = pcg_denoisers(overlapping, "ve", 3.0)
    a = run_pcg(cond, guided, x, sigmas, "ve", 1, seed=1)
    assert torch.equal(a, run_pcg(cond, guided, x, sigmas, "ve", 1, seed=1))
    assert not torch.allclose(a, run_pcg(cond, guided, x, sigmas, "ve", 1, seed=2))


def test_langevin_step_ratio():
    ve, flow = gs.ve_half_log_snr, gs.flow_half_log_snr
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # uncapped: δ = c·(σ² − σ'²), ρ = δ/σ'²
    assert float(gs.langevin_step_ratio(t(1.2), t(1.0), ve, 0.5)) == pytest.approx(0.5 * (1.44 - 1.0))
    assert float(gs.langevin_step_ratio(t(2.0), t(1.0), ve, 0.5)) == pytest.approx(0.5)  # capped at c·σ'²
    # flow: VE-equivalent σ̃ = σ/(1 − σ)
    s, s_next = 0.5, 0.45
    ve_equiv = (s / (1 - s)) ** 2 / (s_next / (1 - s_next)) ** 2 - 1
    assert float(gs.langevin_step_ratio(t(s), t(s_next), flow, 0.3)) == pytest.approx(0.3 * ve_equiv)
    assert float(gs.langevin_step_ratio(t(1.0), t(0.9), flow, 0.3)) == pytest.approx(0.3)  # σ = 1: infinite noise


def gaussian_pair(mu, tau, sigma, parameterization):
    """1-D data p(x0|c) = N(μ, 1), p(x0) = N(0, τ²) noised at σ: their exact denoisers and marginal variances."""
    alpha = 1 - sigma if parameterization == "flow" else 1.0
    var_c, var_u = alpha ** 2 + sigma ** 2, alpha ** 2 * tau ** 2 + sigma ** 2

    def cond(x):
        return mu + alpha / var_c * (x - alpha * mu)

    def uncond(x):
        return alpha * tau ** 2 / var_u * x

    return cond, uncond, alpha * mu, var_c, var_u


@pytest.mark.parametrize("parameterization,sigma", [("ve", 0.8), ("flow", 0.5)])
@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_langevin_corrector_converges_to_the_powered_gaussian(parameterization, sigma, gamma):
    """p_γ ∝ N(αμ, v_c)^γ · N(0, v_u)^(1−γ): precision γ/v_c + (1−γ)/v_u, mean (γ·αμ/v_c)/precision."""
    mu, tau = 2.0, 3.0
    cond, uncond, mean_c, var_c, var_u = gaussian_pair(mu, tau, sigma, parameterization)
    precision = gamma / var_c + (1 - gamma) / var_u
    target_mean, target_var = gamma * mean_c / var_c / precision, 1 / precision

    def guided(x, _sigma):
        u = uncond(x)
        return u + gamma * (cond(x) - u)

    ratio = 0.01
    x = torch.zeros(8000, dtype=torch.float64)  # a point far from the target's bulk
    generator = torch.Generator().manual_seed(0)
    x = gs.langevin_correct(x, torch.tensor(sigma, dtype=torch.float64), guided,
                            half_log_snr=HALF_LOG_SNR[parameterization], ratio=ratio, steps=1500,
                            noise=lambda like: torch.randn(like.shape, generator=generator, dtype=like.dtype))
    # unadjusted Langevin's O(ρ) variance bias on a Gaussian: v/(1 − k/2), k = ρσ²/v
    k = ratio * sigma ** 2 / target_var
    assert float(x.mean()) == pytest.approx(target_mean, abs=4 * math.sqrt(target_var / 8000) + 1e-3)
    assert float(x.var()) == pytest.approx(target_var / (1 - k / 2), rel=0.05)
    assert float(x.var()) == pytest.approx(target_var, rel=0.06)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pcg_half_precision(mixture, dtype):
    sigmas = torch.tensor(flow_sigmas(6), dtype=torch.float32)
    x64 = start("flow", sigmas.double())
    cond, guided = pcg_denoisers(mixture, "flow", 3.0)
    reference = run_pcg(cond, guided, x64, sigmas.double(), "flow", 1)
    got = run_pcg(lambda x, s: cond(x, s).to(dtype), lambda x, s: guided(x, s).to(dtype), x64.to(dtype), sigmas,
                  "flow", 1)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.double() - reference).abs().max() / reference.abs().max() < 3e-2


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def _noop_denoiser(x, s):
    return x, x


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver_type="euler"), "solver_type"),
    (dict(eta=-1.0), "eta"),
    (dict(s_noise=float("nan")), "s_noise"),
    (dict(sigmas=torch.tensor([1.0, 2.0, 0.0])), "decrease"),
    (dict(sigmas=torch.tensor([2.0, 2.0, 0.0])), "decrease"),
    (dict(sigmas=torch.tensor([[2.0, 1.0]])), "1-D"),
    (dict(sigmas=torch.tensor([2.0, -1.0])), "≥ 0"),
    (dict(sigmas=torch.tensor([1.0, 0.5, 0.0]), half_log_snr=gs.flow_half_log_snr), "offset"),
])
def test_cfg_pp_bad_input_is_a_clear_error(kwargs, match):
    args = dict(sigmas=torch.tensor([2.0, 1.0, 0.0]), half_log_snr=gs.ve_half_log_snr, noise_sampler=SeededNoise((1,)))
    args.update(kwargs)
    sigmas = args.pop("sigmas")
    with pytest.raises(gs.SamplerInputError, match=match) as info:
        gs.sample_dpmpp_2m_sde_cfg_pp(_noop_denoiser, torch.zeros(1), sigmas, **args)
    assert "DPM++ 2M SDE CFG++" in str(info.value)
    if "solver_type" not in kwargs:
        with pytest.raises(gs.SamplerInputError, match=match):
            gs.sample_dpmpp_3m_sde_cfg_pp(_noop_denoiser, torch.zeros(1), sigmas, **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(corrector_steps=-1), "corrector_steps"),
    (dict(corrector_steps=1.5), "corrector_steps"),
    (dict(step_scale=0.0), "step_scale"),
    (dict(step_scale=2.0), "step_scale"),
])
def test_pcg_bad_input_is_a_clear_error(kwargs, match):
    args = dict(corrector_steps=1, step_scale=0.5)
    args.update(kwargs)
    with pytest.raises(gs.SamplerInputError, match=match) as info:
        gs.sample_pcg(lambda x, s: x, lambda x, s: x, torch.zeros(1), torch.tensor([2.0, 1.0, 0.0]),
                      half_log_snr=gs.ve_half_log_snr, langevin_noise=torch.randn_like, **args)
    assert "PCG" in str(info.value)


@pytest.mark.parametrize("parameterization", ["ve", "flow"])
def test_pcg_noise_scale_scales_only_the_langevin_noise(mixture, parameterization):
    """A model's noise scale s multiplies the corrector's noise (x = α·x0 + σ·s·n), as ComfyUI's SDE samplers
    multiply s_noise by it; the predictor and the drift are unchanged."""
    sigmas = sigmas_for(parameterization)
    x0 = start(parameterization, sigmas)
    cond, guided = pcg_denoisers(mixture, parameterization, 3.0)
    scaled = run_pcg(cond, guided, x0, sigmas, parameterization, corrector_steps=2, noise_scale=2.5)

    class Doubled(SeededNoise):
        def __call__(self, *args):
            return 2.5 * super().__call__(*args)

    reference = gs.sample_pcg(cond, guided, x0, sigmas, half_log_snr=HALF_LOG_SNR[parameterization],
                              langevin_noise=Doubled(x0.shape, seed=4), corrector_steps=2, step_scale=0.5)
    assert torch.allclose(scaled, reference, atol=1e-10)
    unscaled = run_pcg(cond, guided, x0, sigmas, parameterization, corrector_steps=2)
    assert not torch.allclose(scaled, unscaled, atol=1e-3)
