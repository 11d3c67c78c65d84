"""Adaptive Guidance and LinearAG: fewer model calls per run (pure torch).

**Adaptive Guidance (AG)** — Castillo et al., "Adaptive Guidance: Training-free Acceleration of
Conditional Diffusion Models", arXiv 2312.12487 (AAAI 2025). At every evaluation the cosine
similarity of the conditional and unconditional noise predictions is measured,

    γ_t = ⟨ε_c, ε_u⟩ / (‖ε_c‖·‖ε_u‖),   ε = (x − D)/σ   (per sample, over all latent dims),

and once ``γ_t ≥ γ̄`` the unconditional branch is switched off **for the rest of the run**
(one-way), so every later step costs one conditional pass. The cosine is taken on ε (= (x − D)/σ,
the paper's space), never on the denoised predictions D, whose cosine is dominated by the shared
image content and is ≈1 from the first step. With a batch the switch happens when every sample
passes (the batch minimum), because a batched call cannot drop one sample's row. The same
criterion, ``cos(ε_c, ε_b)``, switches off any extra branch B (PAG, SEG, skip-layer ...).

**LinearAG** (same paper): the unconditional prediction of a skipped evaluation is replaced by an
affine combination of past estimates,

    ε̂_u,t = a·ε_c,t + b·ε_u,t−1 + c·ε_c,t−1.

The paper fits (a, b, c) offline by least squares on recorded CFG trajectories, per model and
scheduler; tables like that cannot ship for every checkpoint. Here the regression is fitted
**online, on the run's own trajectory**: the first ``calibration_steps`` evaluations run the
true uncond, their (ε_c, ε_u) pairs accumulate the 3×3 normal equations, and afterwards only every
``refresh_every``-th evaluation runs the true uncond (refining the fit); the others use the
estimate. Its error is measured in the tests and the benchmark (relative to ‖ε_c − ε_u‖, the
guidance direction the estimate has to reproduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tensor_ops import batch_dot, batch_norm, per_sample, safe_divide, to_f32

UNCOND = "uncond"


def noise_prediction(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """ε = (x − D)/σ in float32 (ComfyUI's VE frame; on flow models the same ratio)."""
    return (to_f32(x) - to_f32(denoised)) / per_sample(sigma, x)


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) per sample, float32, shape [B]; 0 where either vector is zero."""
    return safe_divide(batch_dot(a, b), batch_norm(a) * batch_norm(b)).reshape(-1)


def guidance_cosine(x: torch.Tensor, cond: torch.Tensor, other: torch.Tensor, sigma) -> torch.Tensor:
    """AG's criterion γ per sample: cos(ε_c, ε_other) from denoised predictions."""
    return cosine_per_sample(noise_prediction(x, cond, sigma), noise_prediction(x, other, sigma))


@dataclass
class LinearFit:
    """Online least squares for ε_u,t ≈ a·ε_c,t + b·ε_u,t−1 + c·ε_c,t−1 (pooled over pixels)."""

    gram: torch.Tensor = field(default_factory=lambda: torch.zeros(3, 3, dtype=torch.float64))
    moment: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    pairs: int = 0
    forget: float = 0.5  # weight of older evaluations halves at every new one: the fit tracks the current σ

    def add(self, eps_cond: torch.Tensor, prev_uncond: torch.Tensor, prev_cond: torch.Tensor,
            eps_uncond: torch.Tensor) -> None:
        features = torch.stack([eps_cond.reshape(-1), prev_uncond.reshape(-1), prev_cond.reshape(-1)], dim=1)
        features = features.double().cpu()
        self.gram = self.forget * self.gram + features.T @ features
        self.moment = self.forget * self.moment + features.T @ eps_uncond.reshape(-1).double().cpu()
        self.pairs += 1

    def coefficients(self) -> torch.Tensor:
        """(a, b, c); a small ridge keeps the 3×3 system solvable when features are collinear."""
        ridge = 1e-6 * float(self.gram.diagonal().mean().clamp_min(1e-12))
        return torch.linalg.solve(self.gram + ridge * torch.eye(3, dtype=torch.float64), self.moment)


@dataclass
class AdaptiveState:
    """Run-scoped state of Adaptive Guidance / LinearAG."""

    switched: dict[str, int] = field(default_factory=dict)  # evaluation name → evaluation index it stopped at
    last_cosine: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    true_uncond: int = 0
    since_true_uncond: int = 0
    estimated: int = 0
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (ε_c, ε_u) of the previous evaluation
    fit: LinearFit = field(default_factory=LinearFit)


def is_switched(state: AdaptiveState, name: str) -> bool:
    return name in state.switched


def wants_estimate(state: AdaptiveState, calibration_steps: int, refresh_every: int) -> bool:
    """LinearAG: estimate the uncond at this evaluation instead of running it."""
    if state.previous is None or state.fit.pairs == 0 or state.true_uncond < calibration_steps:
        return False
    return state.since_true_uncond + 1 < refresh_every


def observe(state: AdaptiveState, threshold: float, watch: tuple[str, ...], x: torch.Tensor, sigma,
            cond: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    """Update the one-way switches from this evaluation's true predictions (``others``: name → D)."""
    for name, prediction in others.items():
        if name not in watch or name in state.switched:
            continue
        gamma = float(guidance_cosine(x, cond, prediction, sigma).min())
        state.last_cosine[name] = gamma
        if gamma >= threshold:
            state.switched[name] = state.evaluations


def record_uncond(state: AdaptiveState, x: torch.Tensor, sigma, cond: torch.Tensor, uncond: torch.Tensor,
                  true_evaluation: bool, fit: bool) -> None:
    """LinearAG bookkeeping after an evaluation whose uncond was run (or estimated)."""
    eps_c = noise_prediction(x, cond, sigma)
    eps_u = noise_prediction(x, uncond, sigma)
    if true_evaluation:
        if fit and state.previous is not None and state.previous[0].shape == eps_c.shape:
            state.fit.add(eps_c, state.previous[1], state.previous[0], eps_u)
        state.true_uncond += 1
        state.since_true_uncond = 0
    else:
        state.estimated += 1
        state.since_true_uncond += 1
    state.previous = (eps_c, eps_u)


def estimate_uncond(state: AdaptiveState, x: torch.Tensor, sigma, cond: torch.Tensor) -> torch.Tensor:
    """LinearAG's Û = x − σ·(a·ε_c + b·ε_u,prev + c·ε_c,prev), in the dtype of ``cond``."""
    if state.previous is None or state.fit.pairs == 0:
        raise ValueError("LinearAG: no calibrated regression yet (needs two evaluated steps)")
    a, b, c = (float(v) for v in state.fit.coefficients())
    eps_c = noise_prediction(x, cond, sigma)
    prev_c, prev_u = state.previous
    eps_u = a * eps_c + b * prev_u + c * prev_c
    return (to_f32(x) - per_sample(sigma, x) * eps_u).to(cond.dtype)


def finish_evaluation(state: AdaptiveState) -> None:
    state.evaluations += 1
