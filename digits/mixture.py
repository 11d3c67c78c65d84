"""The exact Gaussian-mixture benchmark: guidance plans sampled on closed-form denoisers (pure torch).

The mixture is fitted to the training digits: class c has x0 ~ N(μ_c, diag(v_c)) in 8×8 pixels
(per-pixel variances floored at ``MIN_VARIANCE``, classes weighted by their frequency). Noised as
ComfyUI samples ε-models, ``x = x0 + σ·n``; then ``x | c ~ N(μ_c, diag(v_c + σ²))`` and

    E[x0 | x, c] = μ_c + v_c / (v_c + σ²) · (x − μ_c)

is the exact conditional denoiser, the posterior-weighted mixture of these the exact unconditional
one. A guidance plan (as a node puts it on a MODEL) is sampled with Euler on these denoisers through
the pack's own combine (``guiders/combine.py``), and the result is compared with the true
conditional distribution: at cfg 1 an exact sampler reproduces it, so the distance measures what
guidance changes, free of any network error. Methods that need a network (the perturbation
branches, ICG) have no exact counterpart here and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..guiders.combine import GuidanceState, StepInputs, after_evaluation, combine, needs
from ..guiders.methods.icg import IndependentCondition
from ..guiders.plan import GuidancePlan
from ..guiders.progress import PercentToSigma, log_linear_percent_to_sigma, step_position
from .metrics import frechet_distance_from_statistics, gaussian_statistics

MIN_VARIANCE = 0.01


class MixtureBenchmarkError(ValueError):
    """A plan the exact benchmark cannot run; the message says which method and why."""


@dataclass(frozen=True)
class DiagonalGaussianMixture:
    means: torch.Tensor  # [K, D] float64
    variances: torch.Tensor  # [K, D]
    weights: torch.Tensor  # [K]
    shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8)

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, min_variance: float = MIN_VARIANCE):
        flat = images.double().flatten(1)
        classes = labels.unique(sorted=True)
        if not torch.equal(classes, torch.arange(classes.numel())):
            raise ValueError("Guidance Kit mixture: labels must be 0…K−1 with every class present")
        means = torch.stack([flat[labels == c].mean(0) for c in classes])
        variances = torch.stack([flat[labels == c].var(0, unbiased=True) for c in classes]).clamp_min(min_variance)
        weights = torch.stack([(labels == c).double().mean() for c in classes])
        return cls(means, variances, weights, tuple(images.shape[1:]))

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.double().reshape(x.shape[0], -1)

    @staticmethod
    def _sigma_column(sigma, batch: int) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        return (s.expand(batch) if s.numel() == 1 else s).reshape(-1, 1)

    def denoise_cond(self, x: torch.Tensor, sigma, labels: torch.Tensor) -> torch.Tensor:
        xf = self._flat(x)
        s2 = self._sigma_column(sigma, x.shape[0]) ** 2
        mu, var = self.means[labels], self.variances[labels]
        return (mu + var / (var + s2) * (xf - mu)).reshape(x.shape).to(x.dtype)

    def log_likelihoods(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p(x | c) for every class, [B, K]."""
        xf = self._flat(x)[:, None, :]
        total_var = self.variances[None] + self._sigma_column(sigma, x.shape[0])[:, :, None] ** 2  # [B, K, D]
        return -0.5 * (((xf - self.means[None]) ** 2) / total_var + torch.log(2 * math.pi * total_var)).sum(-1)

    def posterior(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return torch.softmax(self.log_likelihoods(x, sigma) + self.weights.log()[None], dim=1)

    def denoise_uncond(self, x: torch.Tensor, sigma) -> torch.Tensor:
        xf = self._flat(x)
        s2 = self._sigma_column(sigma, x.shape[0])[:, :, None] ** 2
        gain = self.variances[None] / (self.variances[None] + s2)
        per_class = self.means[None] + gain * (xf[:, None] - self.means[None])
        r = self.posterior(x, sigma)[:, :, None]
        return (r * per_class).sum(1).reshape(x.shape).to(x.dtype)

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn((labels.shape[0], self.means.shape[1]), generator=generator, dtype=torch.float64)
        return (self.means[labels] + self.variances[labels].sqrt() * noise).reshape((-1,) + self.shape)

    def classify(self, x0: torch.Tensor) -> torch.Tensor:
        """Bayes-optimal class of clean samples."""
        return self.posterior(x0, 0.0).argmax(dim=1)

    def distance_to_conditional(self, samples: torch.Tensor, label: int) -> float:
        """Fréchet (2-Wasserstein²) distance between a Gaussian fitted to ``samples`` and the true p(x0 | c)."""
        mu, cov = gaussian_statistics(self._flat(samples))
        return frechet_distance_from_statistics(mu, cov, self.means[label].numpy(),
                                                torch.diag(self.variances[label]).numpy())


def check_exact(plan: GuidancePlan) -> None:
    if plan.extra:
        names = ", ".join(t.label for t in plan.extra)
        raise MixtureBenchmarkError(f"Guidance Kit mixture benchmark: {names} perturb(s) a network; the exact "
                                    f"mixture has none, so only CFG-space methods can run here")
    if plan.get(IndependentCondition.KEY) is not None:
        raise MixtureBenchmarkError("Guidance Kit mixture benchmark: ICG needs a network's embedding; the exact "
                                    "mixture has no condition embedding")


def sample_with_plan(plan: GuidancePlan, mixture: DiagonalGaussianMixture, labels: torch.Tensor, cond_scale: float,
                     sigmas: Sequence[float], seed: int = 0,
                     percent_to_sigma: PercentToSigma | None = None) -> torch.Tensor:
    """Euler samples of ``plan`` on the exact denoisers, one per label, started as ComfyUI starts ε-models.

    ``percent_to_sigma``: the progress convention of the schedules (a model's ``model_sampling.percent_to_sigma``);
    default: log σ linear over the range of ``sigmas`` (ComfyUI's EDM convention).
    """
    check_exact(plan)
    plan = plan.for_model("ve")
    sigmas = [float(s) for s in sigmas]
    if percent_to_sigma is None:
        percent_to_sigma = log_linear_percent_to_sigma(min(s for s in sigmas if s > 0), sigmas[0])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((labels.shape[0],) + mixture.shape, generator=generator, dtype=torch.float64)
    x = noise * math.sqrt(1.0 + sigmas[0] ** 2)
    state = GuidanceState()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma = torch.full((x.shape[0],), s, dtype=torch.float64)
        position = step_position(sigmas, s, percent_to_sigma)
        need = needs(plan, position, s, state)
        cond = mixture.denoise_cond(x, sigma, labels) if need.cond else x
        uncond = mixture.denoise_uncond(x, sigma) if need.uncond else None
        estimate = after_evaluation(plan, state, need, position, x, sigma, cond, uncond, {})
        if estimate is not None:
            uncond = estimate
        inputs = StepInputs(x=x, sigma=sigma, cond_scale=cond_scale, position=position, parameterization="ve",
                            cond=cond, uncond=uncond, branches={})
        denoised, _ = combine(plan, inputs, state)
        x = x + (s_next - s) * (x - denoised) / s
    return x


@dataclass(frozen=True)
class MixtureResult:
    distance: float  # mean over classes of the distance to p(x0 | c)
    adherence: float  # Bayes-optimal classifier agrees with the requested class
    mean_abs: float


def evaluate_plan(plan: GuidancePlan, mixture: DiagonalGaussianMixture, cond_scale: float, sigmas: Sequence[float],
                  samples_per_class: int = 500, seed: int = 0,
                  percent_to_sigma: PercentToSigma | None = None) -> MixtureResult:
    classes = mixture.means.shape[0]
    labels = torch.arange(classes).repeat_interleave(samples_per_class)
    samples = sample_with_plan(plan, mixture, labels, cond_scale, sigmas, seed, percent_to_sigma)
    return summarize(mixture, samples, labels)


def summarize(mixture: DiagonalGaussianMixture, samples: torch.Tensor, labels: torch.Tensor) -> MixtureResult:
    distances = [mixture.distance_to_conditional(samples[labels == c], int(c)) for c in labels.unique()]
    return MixtureResult(distance=float(sum(distances) / len(distances)),
                         adherence=float((mixture.classify(samples) == labels).double().mean()),
                         mean_abs=float(samples.abs().mean()))


def exact_sample_floor(mixture: DiagonalGaussianMixture, samples_per_class: int = 500, seed: int = 0) -> MixtureResult:
    """The same statistics for true samples: the finite-sample floor of ``distance``."""
    labels = torch.arange(mixture.means.shape[0]).repeat_interleave(samples_per_class)
    return summarize(mixture, mixture.sample(labels, torch.Generator().manual_seed(seed)), labels)
