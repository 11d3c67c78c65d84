"""Documented effects of each method, sampled with Euler on exact Gaussian-mixture denoisers.

The true conditional distribution is known, so "guidance works" becomes a measurable statement:
at cfg 1 the sampler reproduces p(x0 | c); raising the scale moves samples away from the other
classes (adherence up, beyond what the data has); APG/rescale keep the sample norm from blowing up
at high scale; windows cut model calls.
"""

import pytest
import torch

from guidance_kit.guiders.methods.apg import APG
from guidance_kit.guiders.methods.cfg_schedule import CFGSchedule
from guidance_kit.guiders.methods.cfg_zero_star import CFGZeroStar
from guidance_kit.guiders.methods.fdg import FDG
from guidance_kit.guiders.methods.rescale import Rescale
from guidance_kit.guiders.plan import GuidancePlan
from guidance_kit.guiders.schedules import Schedule, Window

from .gmm import GaussianMixture, flow_sigmas, karras_sigmas
from .helpers import sample_plan

SHAPE = (2, 8, 8)


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(7)
    directions = torch.randn((3,) + SHAPE, generator=g, dtype=torch.float64)
    directions = directions / directions.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    means = 1.1 * directions  # overlapping classes: Bayes accuracy < 1 even for exact samples
    return GaussianMixture(means, std=1.0)


def adherence(gmm, samples, label):
    return (gmm.classify(samples) == label).double().mean().item()


def push(gmm, samples, label):
    """How far the sample mean moved along the direction away from the other classes' means."""
    others = torch.stack([gmm.means[k] for k in range(gmm.means.shape[0]) if k != label]).mean(0)
    direction = (gmm.means[label] - others).flatten()
    direction = direction / direction.norm()
    return float((samples.mean(0) - gmm.means[label]).flatten() @ direction)


@pytest.mark.parametrize("parameterization,sigmas", [("ve", karras_sigmas(60)), ("flow", flow_sigmas(60))])
def test_cfg_one_reproduces_the_conditional_distribution(mixture, parameterization, sigmas):
    samples, _ = sample_plan(GuidancePlan(), mixture, 0, 1.0, sigmas, n=2048, parameterization=parameterization)
    assert (samples.mean(0) - mixture.means[0]).abs().mean() < 0.05
    assert samples.std(0).mean() == pytest.approx(mixture.std, rel=0.06)


@pytest.mark.parametrize("parameterization,sigmas", [("ve", karras_sigmas(30)), ("flow", flow_sigmas(30))])
def test_cfg_scale_moves_samples_toward_the_class(mixture, parameterization, sigmas):
    stats = []
    for w in (1.0, 2.0, 4.0):
        samples, _ = sample_plan(GuidancePlan(), mixture, 1, w, sigmas, n=1024, parameterization=parameterization)
        stats.append((adherence(mixture, samples, 1), push(mixture, samples, 1)))
    accs, pushes = zip(*stats)
    assert accs[0] < accs[1] < accs[2]
    assert pushes[0] < pushes[1] < pushes[2]
    assert abs(pushes[0]) < 0.1  # w = 1: the class mean itself


def test_apg_reduces_overshoot_at_high_scale_and_keeps_adherence(mixture):
    """CFG at high scale pushes samples far past the class mean (the mixture's 'oversaturation');
    APG's projection (η = 0) and negative momentum remove most of that push, not the adherence."""
    sigmas = karras_sigmas(30)
    cfg, _ = sample_plan(GuidancePlan(), mixture, 2, 12.0, sigmas, n=512)
    no_momentum = GuidancePlan().with_method(APG(eta=0.0, norm_threshold=0.0, momentum=0.0))
    paper = GuidancePlan().with_method(APG(eta=0.0, norm_threshold=0.0, momentum=-0.5))
    projected, _ = sample_plan(no_momentum, mixture, 2, 12.0, sigmas, n=512)
    apg, _ = sample_plan(paper, mixture, 2, 12.0, sigmas, n=512)
    assert push(mixture, apg, 2) < push(mixture, projected, 2) < push(mixture, cfg, 2)
    assert push(mixture, apg, 2) < 0.8 * push(mixture, cfg, 2)
    assert adherence(mixture, apg, 2) > 0.99


def test_rescale_pulls_the_sample_spread_back_toward_the_data(mixture):
    sigmas = karras_sigmas(30)
    cfg, _ = sample_plan(GuidancePlan(), mixture, 0, 10.0, sigmas, n=512)
    plan = GuidancePlan().with_method(Rescale(1.0))
    res, _ = sample_plan(plan, mixture, 0, 10.0, sigmas, n=512)
    assert abs(res.std(0).mean() - mixture.std) < abs(cfg.std(0).mean() - mixture.std)


def test_guidance_interval_skips_uncond_calls_outside_the_window(mixture):
    sigmas = karras_sigmas(20)
    plan = GuidancePlan().with_method(CFGSchedule(Schedule(window=Window(sigma_low=0.28, sigma_high=5.42))))
    samples, den = sample_plan(plan, mixture, 0, 3.0, sigmas, n=256)
    inside = sum(1 for s in sigmas[:-1] if 0.28 < s <= 5.42)
    assert den.calls["cond"] == 20 and den.calls["uncond"] == inside < 20
    full, _ = sample_plan(GuidancePlan(), mixture, 0, 3.0, sigmas, n=256)
    plain, _ = sample_plan(GuidancePlan(), mixture, 0, 1.0, sigmas, n=256)
    assert push(mixture, plain, 0) < push(mixture, samples, 0) < push(mixture, full, 0)


def test_cfg_zero_star_zero_init_holds_the_first_step_on_flow(mixture):
    sigmas = flow_sigmas(25)
    plan = GuidancePlan().with_method(CFGZeroStar(True, 2))
    samples, den = sample_plan(plan, mixture, 1, 4.0, sigmas, n=512, parameterization="flow")
    assert den.calls["cond"] == 23 and den.calls["uncond"] == 23
    assert torch.isfinite(samples).all()
    assert adherence(mixture, samples, 1) > 0.9


def test_fdg_low_frequency_scale_controls_the_mean_shift(mixture):
    """Guidance on the coarse band moves the (smooth) mean; FDG with a low coarse scale moves it less."""
    sigmas = karras_sigmas(25)
    strong = GuidancePlan().with_method(FDG(scales=(6.0, 6.0)))
    weak_low = GuidancePlan().with_method(FDG(scales=(6.0, 1.5)))
    s_strong, _ = sample_plan(strong, mixture, 0, 1.0, sigmas, n=512)
    s_weak, _ = sample_plan(weak_low, mixture, 0, 1.0, sigmas, n=512)
    assert push(mixture, s_weak, 0) < push(mixture, s_strong, 0)
