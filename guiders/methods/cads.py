"""CADS · Condition-Annealed Diffusion Sampler: Gaussian noise on the prompt's conditioning early in the run,
annealed to none, for more diverse samples at high cfg (stage 0, a condition transform; it acts inside the
model call, through ``nodes/contributors/condition_noise.py``).

Paper: Sadat, Buhmann, Bradley, Hilliges, Weber, "CADS: Unleashing the Diversity of Diffusion Models through
Condition-Annealed Sampling", ICLR 2024 (arXiv 2310.17347), eqs. 4–6. No official code was released; the
reference read is the A1111 port v0xie/sd-webui-cads (``scripts/cads.py``: ``cads_linear_schedule``,
``add_noise``). With t = 1 − progress (1 = pure noise; the reference uses the step fraction) and y the
condition (the text tokens):

    γ(t)  = 1 for t ≤ τ₁,  (τ₂ − t)/(τ₂ − τ₁) for τ₁ < t < τ₂,  0 for t ≥ τ₂
    ŷ     = √γ·y + s·√(1 − γ)·n,    n ~ N(0, I)
    ŷ_r   = (ŷ − mean(ŷ))/std(ŷ)·std(y) + mean(y)           (rescale, per sample over tokens and channels)
    y'    = ψ·ŷ_r + (1 − ψ)·ŷ

Defaults: the paper's and the reference's τ₁ = 0.6, τ₂ = 0.9, s = 0.25, ψ = 1, rescale on; like the reference
it noises the prompt's and the uncond's tokens (``apply_to_uncond``). The pack's choices: the noise is drawn per
step from (seed, σ) and shared by the rows of a batch, so a split run and a batch equal single runs (samples
still differ through their own latent noise); mean and std are per sample (the reference takes them over the
whole batch); only text tokens are noised (the reference also noises SDXL's pooled/size vector); branches
evaluated with the prompt (PAG, SEG, ...) get the prompt's noised tokens, so C − B compares like with like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..plan import ConditionTransform, PlanError
from ..tensor_ops import sample_dims, to_f32

STD_EPS = 1e-12


def annealing(t: float, tau1: float, tau2: float) -> float:
    """γ(t): 1 late in the run (t ≤ τ₁), 0 early (t ≥ τ₂), linear between."""
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def anneal_condition(embedding: torch.Tensor, gamma: float, noise: torch.Tensor, noise_scale: float, psi: float,
                     rescale: bool = True) -> torch.Tensor:
    """y' from y (``embedding`` [B, ...]) and ``noise`` (broadcast to it), in float32."""
    y = to_f32(embedding)
    noisy = math.sqrt(gamma) * y + noise_scale * math.sqrt(1.0 - gamma) * to_f32(noise)
    if not rescale:
        return noisy
    dims = sample_dims(y)
    mean_y, std_y = y.mean(dim=dims, keepdim=True), y.std(dim=dims, keepdim=True)
    mean_n, std_n = noisy.mean(dim=dims, keepdim=True), noisy.std(dim=dims, keepdim=True)
    rescaled = torch.where(std_n > STD_EPS, (noisy - mean_n) / std_n.clamp_min(STD_EPS) * std_y + mean_y, noisy)
    return psi * rescaled + (1.0 - psi) * noisy


@dataclass(frozen=True)
class CADS(ConditionTransform):
    KEY = "cads"

    tau1: float = 0.6
    tau2: float = 0.9
    noise_scale: float = 0.25
    psi: float = 1.0
    rescale: bool = True
    apply_to_uncond: bool = True
    seed: int = 0
    label: str = "CADS"

    def validate(self) -> None:
        if not 0.0 <= self.tau1 < self.tau2 <= 1.0:
            raise PlanError(f"{self.label}: need 0 ≤ tau1 < tau2 ≤ 1 (the annealing runs from t = tau2 to tau1, t = 1 "
                            f"at pure noise); got tau1 {self.tau1}, tau2 {self.tau2}")
        if not (math.isfinite(self.noise_scale) and self.noise_scale >= 0):
            raise PlanError(f"{self.label}: noise_scale must be ≥ 0; got {self.noise_scale}")
        if not 0.0 <= self.psi <= 1.0:
            raise PlanError(f"{self.label}: psi (mixing factor) must be in [0, 1]; got {self.psi}")

    def gamma_at(self, progress: float) -> float:
        return annealing(1.0 - progress, self.tau1, self.tau2)

    def acts_at(self, progress: float) -> bool:
        return self.gamma_at(progress) < 1.0

    def transform_condition(self, embedding: torch.Tensor, progress: float, noise: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma_at(progress)
        if gamma >= 1.0:
            return embedding
        return anneal_condition(embedding, gamma, noise, self.noise_scale, self.psi, self.rescale).to(embedding.dtype)
