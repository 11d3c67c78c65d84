"""β-CFG's normalisations: the paper's L2 norm (exactly the official formula) and the pack's default,
per-element RMS at the paper's reference size (the same strength at every latent size, on eps and flow)."""

import pytest
import torch

from guidance_kit.guiders.combine import GuidanceState, combine
from guidance_kit.guiders.methods.beta_cfg import BETA_REFERENCE_ELEMENTS, BetaCFG, beta_cfg_factor
from guidance_kit.guiders.plan import GuidancePlan, PlanError
from guidance_kit.guiders.schedules import beta_pdf

from .helpers import step_inputs


def run(plan, inp):
    return combine(plan, inp, GuidanceState())[0]


def beta_plan(**kwargs) -> GuidancePlan:
    return GuidancePlan.of(BetaCFG(**kwargs))


def smooth_field(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """A smooth random field at ``size``² (bilinear from 8×8): the same picture at every size."""
    coarse = torch.randn(batch, channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)


def predictions(size: int, channels: int = 4, sigma: float = 2.0):
    x = 3.0 * smooth_field(2, channels, size, seed=1)
    cond = smooth_field(2, channels, size, seed=2)
    uncond = cond + 0.1 * smooth_field(2, channels, size, seed=3)
    return x, cond, uncond, sigma


def epsilon_guidance(guided, uncond, sigma):
    """The guidance in the model's (x − D)/σ space (ε on eps/v models, the velocity on flow models)."""
    return (uncond - guided) / sigma


def rms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).square().mean(dim=1).sqrt()


@pytest.mark.parametrize("gamma", [1.0, 0.5])
@pytest.mark.parametrize("parameterization", ["ve", "flow"])
def test_l2_mode_is_the_official_formula(gamma, parameterization):
    """gmum/beta-CFG ``ddim_geo_beta``: ε̂ = ε_u + w·β(τ)·(ε_c − ε_u)/‖ε_c − ε_u‖^γ, L2 over dims (1, 2, 3)."""
    x, c, u, sigma = predictions(16)
    w, step, n, a, b = 7.5, 4, 10, 2.0, 3.0
    got = run(beta_plan(a=a, b=b, gamma=gamma, normalization="l2"),
              step_inputs(x, c, u, sigma=sigma, cond_scale=w, step=step, n_steps=n,
                          parameterization=parameterization))
    eps_c, eps_u = (x - c) / sigma, (x - u) / sigma
    diff = eps_c - eps_u
    norm = torch.norm(diff, p=2, dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
    eps = eps_u + w * (diff / norm ** gamma) * beta_pdf(step / (n - 1), a, b)
    assert torch.allclose(got, x - sigma * eps, atol=1e-5)


@pytest.mark.parametrize("mode", ["rms", "l2"])
def test_per_element_strength_vs_latent_size(mode):
    """The same content at 64² and 128²: RMS mode gives the same guidance field (per element), the paper's L2
    mode half of it at 128² (its fixed L2 length is spread over 4× as many values)."""
    w, step, n = 7.5, 4, 10
    fields = {}
    for size in (64, 128):
        x, c, u, sigma = predictions(size)
        guided = run(beta_plan(normalization=mode), step_inputs(x, c, u, sigma=sigma, cond_scale=w, step=step,
                                                                n_steps=n))
        fields[size] = epsilon_guidance(guided, u, sigma)
    ratio = rms(fields[128]) / rms(fields[64])
    if mode == "rms":
        assert torch.allclose(ratio, torch.ones(2), rtol=2e-3)
    else:
        assert torch.allclose(ratio, torch.full((2,), 0.5), rtol=2e-3)


def test_rms_guidance_of_an_upsampled_latent_is_the_upsampled_guidance():
    """The 64² predictions upsampled 2× (nearest): the 128² guidance is exactly the 64² guidance upsampled."""
    x, c, u, sigma = predictions(64)
    up = [t.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2) for t in (x, c, u)]
    small = run(beta_plan(), step_inputs(x, c, u, sigma=sigma, cond_scale=7.5, step=4, n_steps=10))
    large = run(beta_plan(), step_inputs(*up, sigma=sigma, cond_scale=7.5, step=4, n_steps=10))
    expected = small.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    assert torch.allclose(large, expected, atol=1e-5)


@pytest.mark.parametrize("parameterization", ["ve", "flow"])
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (2, 16, 128, 128), (1, 16, 3, 32, 32)])
def test_rms_mode_has_the_papers_per_element_length_on_eps_and_flow(parameterization, shape):
    """γ = 1: the guidance's per-element RMS in the model's prediction space is w·β(τ)/√N_ref whatever the
    latent's size, channels (4 or 16), dimensionality (video) or parameterisation."""
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    u = c + 0.05 * torch.randn(shape, generator=g)
    w, step, n, sigma = 5.0, 3, 10, 0.6
    guided = run(beta_plan(a=2.0, b=2.0), step_inputs(x, c, u, sigma=sigma, cond_scale=w, step=step, n_steps=n,
                                                      parameterization=parameterization))
    expected = w * beta_pdf(step / (n - 1), 2.0, 2.0) / BETA_REFERENCE_ELEMENTS ** 0.5
    assert torch.allclose(rms(epsilon_guidance(guided, u, sigma)), torch.full((shape[0],), expected), rtol=1e-4)


def test_rms_equals_l2_at_the_reference_size():
    """At SDXL 1024² (4×128×128 = N_ref) the default is exactly the paper."""
    g = torch.Generator().manual_seed(1)
    c, u = torch.randn(1, 4, 128, 128, generator=g), torch.randn(1, 4, 128, 128, generator=g)
    for gamma in (1.0, 0.7):
        rms_factor = beta_cfg_factor(c, u, 3.0, 0.4, 2.0, 2.0, gamma, normalization="rms")
        l2_factor = beta_cfg_factor(c, u, 3.0, 0.4, 2.0, 2.0, gamma, normalization="l2")
        assert torch.allclose(rms_factor, l2_factor, rtol=1e-6)


def test_rms_factor_is_the_l2_factor_times_the_size_ratio():
    c, u = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    for gamma in (0.0, 0.5, 1.0, 2.0):
        ratio = beta_cfg_factor(c, u, 1.5, 0.3, 2.0, 3.0, gamma, normalization="rms") / \
            beta_cfg_factor(c, u, 1.5, 0.3, 2.0, 3.0, gamma, normalization="l2")
        expected = (4 * 16 * 16 / BETA_REFERENCE_ELEMENTS) ** (gamma / 2) if gamma else 1.0
        assert torch.allclose(ratio, torch.full_like(ratio, expected), rtol=1e-5)


def test_default_is_rms_and_settings_are_checked():
    assert BetaCFG().normalization == "rms"
    with pytest.raises(PlanError, match="normalization"):
        BetaCFG(normalization="linf").validate()
    with pytest.raises(PlanError, match="reference_elements"):
        BetaCFG(reference_elements=0).validate()
    with pytest.raises(ValueError, match="normalization"):
        beta_cfg_factor(torch.ones(1, 4), torch.zeros(1, 4), 1.0, 0.5, 2.0, 2.0, 1.0, normalization="max")
