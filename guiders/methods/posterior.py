"""The posterior a sampler tracks from its own transitions (shared by Feedback Guidance and Dynamic Negative
Guidance, both by Koulischer, Ambrogioni et al.).

Between two evaluations at σ_t (input x_t) and σ_s < σ_t (input x_s), each prediction D of the clean sample
gives the Gaussian reverse kernel q(x_s | x_t, x0 = D). With x_t = α_t·x0 + σ_t·ε (α = 1 on ComfyUI's eps/v
models, whose inputs are the k-diffusion x0 + σ·ε; α = 1 − σ on flow models):

    α_ts = α_t/α_s,  σ²_ts = σ_t² − α_ts²·σ_s²
    μ(D) = (α_ts·σ_s²/σ_t²)·x_t + (α_s·σ²_ts/σ_t²)·D,      σ̃² = σ²_ts·σ_s²/σ_t²

On α = 1 this is the official FBG code's kernel (EDM form, ``update_log_posterior``):
μ = (σ_s²/σ_t²)·x_t + (1 − σ_s²/σ_t²)·D, σ̃² = (σ_t² − σ_s²)·σ_s²/σ_t². The general α is the pack's: the same
kernel for flow models, where σ_t = 1 at the first step (the EDM form of a flow model is infinite there).
The log-likelihood ratio of the step x_t → x_s under two predictions A and B is −(‖x_s − μ(A)‖² −
‖x_s − μ(B)‖²)/(2σ̃²), per sample: the update both methods scale by their temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tensor_ops import sample_dims, to_f32


def alpha_of(sigma: float, parameterization: str) -> float:
    return 1.0 - sigma if parameterization == "flow" else 1.0


def kernel(sigma_t: float, sigma_s: float, parameterization: str) -> tuple[float, float, float]:
    """(coefficient of x_t, coefficient of D, variance σ̃²) of q(x_s | x_t, x0 = D)."""
    alpha_t, alpha_s = alpha_of(sigma_t, parameterization), alpha_of(sigma_s, parameterization)
    alpha_ts = alpha_t / alpha_s if alpha_s > 0 else 0.0
    variance_ts = sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2
    return (alpha_ts * sigma_s ** 2 / sigma_t ** 2, alpha_s * variance_ts / sigma_t ** 2,
            variance_ts * sigma_s ** 2 / sigma_t ** 2)


def transition_variance(sigma_t: float, sigma_s: float, parameterization: str) -> float:
    return kernel(sigma_t, sigma_s, parameterization)[2]


def squared_distance_difference(x_t: torch.Tensor, x_s: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                                sigma_t: float, sigma_s: float, parameterization: str) -> tuple[torch.Tensor, float]:
    """(‖x_s − μ(first)‖² − ‖x_s − μ(second)‖² per sample [B], σ̃²) for the step σ_t → σ_s (float32)."""
    keep, weight, variance = kernel(sigma_t, sigma_s, parameterization)
    base = to_f32(x_s) - keep * to_f32(x_t)
    dims = sample_dims(x_t)
    first_sq = (base - weight * to_f32(first)).square().sum(dim=dims)
    second_sq = (base - weight * to_f32(second)).square().sum(dim=dims)
    return first_sq - second_sq, variance


@dataclass
class Transition:
    """The last evaluation a posterior update starts from: its input, σ and the two predictions compared."""

    x: torch.Tensor
    sigma: float
    first: torch.Tensor
    second: torch.Tensor

    def step_to(self, x: torch.Tensor, sigma: float) -> bool:
        """Whether ``(x, σ)`` is a later state of the same samples (a lower σ, the same shape)."""
        return sigma < self.sigma and x.shape == self.x.shape and x.device == self.x.device
