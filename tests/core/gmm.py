"""Exact denoisers of a class-conditional Gaussian mixture, for eps (VE) and flow noising.

Data: class c has x0 ~ N(μ_c, s²·I) in R^shape, classes drawn with weights π. Noising
``x = a(σ)·x0 + b(σ)·n`` with a = 1, b = σ (VE, as ComfyUI samples eps/v models) or a = 1 − σ,
b = σ (flow). Then x | c ~ N(a·μ_c, (a²s² + b²)·I) and the optimal (conditional) denoiser is

    E[x0 | x, c] = μ_c + a·s²/(a²s² + b²)·(x − a·μ_c),

the unconditional one the posterior-weighted mixture of these. CFG-type guidance applied to these
denoisers therefore has a known ground truth: at w = 1 an exact sampler reproduces p(x0 | c).
"""

from __future__ import annotations

import math

import torch


class GaussianMixture:
    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        self.means = means.double()  # [K, *shape]
        self.std = float(std)
        k = means.shape[0]
        self.weights = (weights if weights is not None else torch.full((k,), 1.0 / k)).double()
        self.shape = tuple(means.shape[1:])

    @staticmethod
    def coefficients(sigma: torch.Tensor, parameterization: str) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if parameterization == "flow":
            return 1.0 - sigma, sigma
        return torch.ones_like(sigma), sigma

    def _bcast(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        if v.numel() == 1:
            v = v.expand(x.shape[0])
        return v.reshape((-1,) + (1,) * (x.ndim - 1))

    def denoise_cond(self, x: torch.Tensor, sigma, label: int | torch.Tensor, parameterization: str = "ve"):
        xd = x.double()
        a, b = self.coefficients(sigma, parameterization)
        a, b = self._bcast(a, xd), self._bcast(b, xd)
        labels = torch.as_tensor(label).reshape(-1).expand(x.shape[0])
        mu = self.means[labels]
        gain = a * self.std ** 2 / (a ** 2 * self.std ** 2 + b ** 2)
        return (mu + gain * (xd - a * mu)).to(x.dtype)

    def log_likelihoods(self, x: torch.Tensor, sigma, parameterization: str = "ve") -> torch.Tensor:
        """log p(x | c) for every class, [B, K]."""
        xd = x.double().flatten(1)
        a, b = self.coefficients(sigma, parameterization)
        a = torch.as_tensor(a).reshape(-1, 1)
        b = torch.as_tensor(b).reshape(-1, 1)
        var = a ** 2 * self.std ** 2 + b ** 2  # [B or 1, 1]
        mu = self.means.flatten(1)  # [K, d]
        d = mu.shape[1]
        sq = ((xd[:, None, :] - a[:, None, :] * mu[None]) ** 2).sum(-1)  # [B, K]
        return -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)

    def posterior(self, x: torch.Tensor, sigma, parameterization: str = "ve") -> torch.Tensor:
        logits = self.log_likelihoods(x, sigma, parameterization) + self.weights.log()[None]
        return torch.softmax(logits, dim=1)

    def denoise_uncond(self, x: torch.Tensor, sigma, parameterization: str = "ve") -> torch.Tensor:
        r = self.posterior(x, sigma, parameterization)  # [B, K]
        out = torch.zeros_like(x, dtype=torch.float64)
        for k in range(self.means.shape[0]):
            weight = r[:, k].reshape((-1,) + (1,) * (x.ndim - 1))
            out += weight * self.denoise_cond(x, sigma, k, parameterization).double()
        return out.to(x.dtype)

    def sample(self, label: int, n: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn((n,) + self.shape, generator=generator, dtype=torch.float64)
        return self.means[label][None] + self.std * noise

    def classify(self, x0: torch.Tensor) -> torch.Tensor:
        """Bayes-optimal class of clean samples."""
        return self.posterior(x0, torch.zeros(x0.shape[0], dtype=torch.float64) + 1e-9, "ve").argmax(dim=1)


def karras_sigmas(n: int, sigma_min: float = 0.03, sigma_max: float = 14.6, rho: float = 7.0) -> list[float]:
    ramp = [i / (n - 1) for i in range(n)]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp] + [0.0]


def flow_sigmas(n: int, shift: float = 3.0) -> list[float]:
    ts = [1.0 - i / n for i in range(n)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts] + [0.0]


def euler_sample(denoise_fn, noise: torch.Tensor, sigmas: list[float], parameterization: str) -> torch.Tensor:
    """ComfyUI's Euler: x ← x + (σ' − σ)·(x − D)/σ, starting from the fully noised latent."""
    x = noise * sigmas[0] if parameterization == "ve" else noise.clone()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, torch.full((x.shape[0],), s, dtype=x.dtype), i)
        x = x + (s_next - s) * (x - denoised) / s
    return x
