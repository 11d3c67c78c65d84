"""The digits quality metrics, the classifier and the exact Gaussian-mixture benchmark (no ComfyUI)."""

import math

import numpy as np
import pytest
import torch

from guidance_kit.digits import metrics
from guidance_kit.digits.classifier import FEATURE_DIM, DigitClassifier
from guidance_kit.digits.mixture import (
    DiagonalGaussianMixture,
    MixtureBenchmarkError,
    check_exact,
    evaluate_plan,
    exact_sample_floor,
)
from guidance_kit.guiders.methods.apg import APG
from guidance_kit.guiders.methods.extra_guidance import ExtraGuidance
from guidance_kit.guiders.plan import Branch, GuidancePlan


def gaussian_features(n, dim, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * scale + shift


def test_frechet_distance_of_identical_sets_is_zero():
    features = gaussian_features(200, 8, 0)
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_forms():
    mean = np.arange(4.0)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    identity = np.eye(4)
    assert metrics.frechet_distance_from_statistics(mean, identity, mean + shift, identity) == pytest.approx(
        float((shift ** 2).sum()))
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    expected = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert metrics.frechet_distance_from_statistics(mean, np.diag(a), mean, np.diag(b)) == pytest.approx(expected)


def test_frechet_distance_grows_with_the_shift_and_is_symmetric():
    base = gaussian_features(500, 6, 1)
    near = gaussian_features(500, 6, 2, shift=0.2)
    far = gaussian_features(500, 6, 3, shift=1.0)
    assert metrics.frechet_distance(base, near) < metrics.frechet_distance(base, far)
    assert metrics.frechet_distance(base, far) == pytest.approx(metrics.frechet_distance(far, base), rel=1e-6)
    assert metrics.frechet_distance(base, far) == pytest.approx(6.0, rel=0.15)  # ‖shift‖² = 6


def test_frechet_distance_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_adherence_and_margin():
    logits = torch.tensor([[5.0, 0.0, 1.0], [0.0, 5.0, 0.0], [0.0, 2.0, 5.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 2])
    assert metrics.adherence(logits, labels) == pytest.approx(0.75)
    assert metrics.classifier_margin(logits, labels) == pytest.approx((4.0 + 5.0 + 3.0 - 5.0) / 4)


def test_mean_pairwise_distance_per_class():
    images = torch.zeros(5, 1, 2, 2)
    images[1, 0, 0, 0] = 3.0  # class 0: two images 3 apart
    images[3, 0, 1, 1] = 1.0  # class 1: three images, distances 1, 1, 0
    images[4, 0, 1, 1] = 1.0
    labels = torch.tensor([0, 0, 1, 1, 1])
    class_one = (1 + 1 + 0) * 2 / 6
    assert metrics.mean_pairwise_distance(images, labels) == pytest.approx((3.0 + class_one) / 2)
    with pytest.raises(ValueError, match="two samples"):
        metrics.mean_pairwise_distance(images[:2], torch.tensor([0, 1]))


def test_saturation_counts_values_beyond_one():
    images = torch.tensor([[-1.0, 1.0, 1.5, -2.0, 1.05, -1.05, 0.0, 0.5]])
    clipped, mean_abs = metrics.saturation(images)
    assert clipped == pytest.approx(2 / 8)  # ±1.05 is within half a grey level of the data range
    assert mean_abs == pytest.approx(8.1 / 8)
    assert metrics.saturation(images, tolerance=0.0)[0] == pytest.approx(4 / 8)


def test_classifier_shapes():
    classifier = DigitClassifier()
    images = torch.rand(7, 1, 8, 8) * 2 - 1
    assert classifier(images).shape == (7, 10)
    logits, features = classifier.predict(images, batch=3)
    assert logits.shape == (7, 10) and features.shape == (7, FEATURE_DIM)
    assert (features >= 0).all()


@pytest.fixture(scope="module")
def split():
    pytest.importorskip("sklearn", reason="scikit-learn provides the digits data set")
    from guidance_kit.digits.data import load_split

    return load_split()


def test_split_is_fixed_and_in_range(split):
    from guidance_kit.digits.data import load_split

    again = load_split()
    assert torch.equal(split.test_labels, again.test_labels)
    assert split.train_images.shape[1:] == (1, 8, 8)
    assert split.train_images.min() >= -1 and split.train_images.max() <= 1
    assert split.test_images.shape[0] == 360 and split.train_images.shape[0] == 1437


def test_shipped_classifier_reads_held_out_digits(split):
    evaluator = metrics.DigitsEvaluator(split.test_images)
    on_real = evaluator.evaluate(split.test_images, split.test_labels)
    assert on_real.adherence > 0.97
    assert on_real.frechet == pytest.approx(0.0, abs=1e-6)
    assert on_real.clipped == 0.0
    noise = torch.rand_like(split.test_images) * 2 - 1
    on_noise = evaluator.evaluate(noise, split.test_labels)
    assert on_noise.adherence < 0.3
    assert on_noise.frechet > 10 * evaluator.evaluate(split.train_images[:360], split.train_labels[:360]).frechet


@pytest.fixture(scope="module")
def mixture(split):
    return DiagonalGaussianMixture.fit(split.train_images, split.train_labels)


def test_mixture_denoisers_at_the_ends_of_the_schedule(mixture):
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 5, 9])
    assert torch.allclose(mixture.denoise_cond(x, 1e-6, labels), x, atol=1e-6)
    far = mixture.denoise_uncond(x * 1000, 1000.0)
    prior_mean = (mixture.weights[:, None] * mixture.means).sum(0).reshape(1, 1, 8, 8)
    assert torch.allclose(far, prior_mean.expand_as(far), atol=0.05)


def sd_sigmas(steps=20):
    """SD1.5's discrete schedule at 'normal' spacing, as ComfyUI computes it for the digits model."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    table = ((1 - alphas) / alphas) ** 0.5
    t = torch.linspace(999, 0, steps)
    log = table.log()
    values = [float(torch.exp(torch.lerp(log[int(math.floor(v))], log[min(int(math.floor(v)) + 1, 999)],
                                         v - math.floor(v)))) for v in t.tolist()]
    return values + [0.0]


def test_cfg_one_reproduces_the_conditional_distribution_and_guidance_moves_away(mixture):
    sigmas = sd_sigmas(30)
    floor = exact_sample_floor(mixture, samples_per_class=300)
    at_one = evaluate_plan(GuidancePlan(), mixture, 1.0, sigmas, samples_per_class=300)
    at_five = evaluate_plan(GuidancePlan(), mixture, 5.0, sigmas, samples_per_class=300)
    assert at_one.distance < 1.5 * floor.distance + 0.05
    assert at_five.distance > 3 * at_one.distance
    assert at_five.adherence >= at_one.adherence
    apg = GuidancePlan().with_method(APG(eta=0.0, norm_threshold=0.0, momentum=-0.5))
    assert evaluate_plan(apg, mixture, 5.0, sigmas, samples_per_class=300).distance < at_five.distance


def test_mixture_benchmark_refuses_network_perturbations():
    term = ExtraGuidance(Branch("PAG", perturbation=object()), scale=3.0, label="PAG")
    with pytest.raises(MixtureBenchmarkError, match="PAG"):
        check_exact(GuidancePlan().with_extra(term))
