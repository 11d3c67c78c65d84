"""Adaptive Guidance and LinearAG: fewer model calls per run (pure torch).

**Adaptive Guidance (AG)** — Castillo et al., "Adaptive Guidance: Training-free Acceleration of
Conditional Diffusion Models", arXiv 2312.12487 (AAAI 2025; no official code). At every evaluation
the cosine similarity of the conditional and unconditional **noise** predictions is measured,

    γ_t = ⟨ε_c, ε_u⟩ / (‖ε_c‖·‖ε_u‖)   (per sample, over all latent dims),

and once ``γ_t ≥ γ̄`` the unconditional branch is switched off **for the rest of the run** (one-way):
the step is conditional-only. ε is the noise the model predicts for ``x = α·x0 + σ·ε`` (ComfyUI's
conventions: α = 1 on eps/v models, α = 1 − σ on flow models), so from a denoised prediction D

    ε̂ = (x − α·D)/σ      (= (x − D)/σ on eps/v models; (x − (1 − σ)·D)/σ on flow models),

the paper's quantity on both, never the velocity (x − D)/σ of a flow model nor the denoised D (whose
cosine is dominated by the shared image content and is ≈1 from the first step). The same criterion,
``cos(ε_c, ε_b)``, switches off any extra branch B (PAG, SEG, skip-layer ...).

**Per sample.** The switch is decided for every sample of the batch on its own (one-way), and a
sample whose switch is off gets the conditional prediction from then on (its uncond/branch rows are
replaced by its cond rows before the plan is combined), so a sample's result does not depend on the
other samples of its batch. The batched model call can only drop a whole chunk: the uncond (or a
branch) stops costing passes once **every** sample of the batch has switched it off; until then the
converged samples' rows are still evaluated (and ignored).

**LinearAG** (same paper): the unconditional prediction of a skipped evaluation is replaced by an
affine combination of past estimates,

    ε̂_u,t = a·ε_c,t + b·ε_u,t−1 + c·ε_c,t−1,

on the network's own output f = (x − D)/σ: ε on eps/v models as in the paper, the velocity on flow
models (the paper has none; regressing flow models' ε instead, which is ≈ x at high noise, leaves errors
of 40–60% of the guidance direction in the first third of the run on the exact flow mixture, against
< 12% on the velocity).

The paper fits (a, b, c) offline by least squares on recorded CFG trajectories, per model and
scheduler; tables like that cannot ship for every checkpoint. Here the regression is fitted
**online, on the run's own trajectory, per sample**: the first ``calibration_steps`` evaluations run
the true uncond, their (ε_c, ε_u) pairs accumulate each sample's 3×3 normal equations, and afterwards
only every ``refresh_every``-th evaluation runs the true uncond (refining the fit); the others use the
estimate. Its error is measured in the tests and the benchmark (relative to ‖ε_c − ε_u‖, the
guidance direction the estimate has to reproduce).

All of this state belongs to one sampler call (the engine's RunState): a run split over two sampler
calls (KSamplerAdvanced 0–k, k–N) starts the switches and the regression again in the second call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tensor_ops import batch_dot, batch_norm, per_sample, safe_divide, to_f32

UNCOND = "uncond"
PARAMETERIZATIONS = ("ve", "flow")


def signal_scale(sigma, like: torch.Tensor, parameterization: str = "ve") -> torch.Tensor:
    """α of ``x = α·x0 + σ·ε`` per sample, [B, 1, ...] float32: 1 (eps/v, "ve") or 1 − σ ("flow")."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")
    s = per_sample(sigma, like)
    return 1.0 - s if parameterization == "flow" else torch.ones_like(s)


def noise_prediction(x: torch.Tensor, denoised: torch.Tensor, sigma, parameterization: str = "ve") -> torch.Tensor:
    """ε̂ = (x − α·D)/σ in float32 (α = 1 on eps/v models, 1 − σ on flow models)."""
    alpha = signal_scale(sigma, x, parameterization)
    return (to_f32(x) - alpha * to_f32(denoised)) / per_sample(sigma, x)


def denoised_from_noise(x: torch.Tensor, noise: torch.Tensor, sigma, parameterization: str = "ve") -> torch.Tensor:
    """Inverse of ``noise_prediction``: D = (x − σ·ε̂)/α (float32)."""
    alpha = signal_scale(sigma, x, parameterization).clamp_min(1e-6)
    return (to_f32(x) - per_sample(sigma, x) * to_f32(noise)) / alpha


def model_output(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """f = (x − D)/σ in float32: the network's own output (ε on eps/v models, the velocity on flow models),
    LinearAG's regression space."""
    return (to_f32(x) - to_f32(denoised)) / per_sample(sigma, x)


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) per sample, float32, shape [B]; 0 where either vector is zero."""
    return safe_divide(batch_dot(a, b), batch_norm(a) * batch_norm(b)).reshape(-1)


def guidance_cosine(x: torch.Tensor, cond: torch.Tensor, other: torch.Tensor, sigma,
                    parameterization: str = "ve") -> torch.Tensor:
    """AG's criterion γ per sample: cos(ε_c, ε_other) from denoised predictions."""
    return cosine_per_sample(noise_prediction(x, cond, sigma, parameterization),
                             noise_prediction(x, other, sigma, parameterization))


@dataclass
class LinearFit:
    """Online least squares for ε_u,t ≈ a·ε_c,t + b·ε_u,t−1 + c·ε_c,t−1, one fit per sample (pooled over
    that sample's latent values), so a sample's estimate does not depend on the rest of its batch."""

    gram: torch.Tensor | None = None  # [B, 3, 3] float64
    moment: torch.Tensor | None = None  # [B, 3]
    pairs: int = 0
    forget: float = 0.5  # weight of older evaluations halves at every new one: the fit tracks the current σ

    def add(self, eps_cond: torch.Tensor, prev_uncond: torch.Tensor, prev_cond: torch.Tensor,
            eps_uncond: torch.Tensor) -> None:
        batch = eps_cond.shape[0]
        features = torch.stack([eps_cond.reshape(batch, -1), prev_uncond.reshape(batch, -1),
                                prev_cond.reshape(batch, -1)], dim=2).double().cpu()  # [B, N, 3]
        target = eps_uncond.reshape(batch, -1).double().cpu()
        gram = features.transpose(1, 2) @ features
        moment = (features.transpose(1, 2) @ target.unsqueeze(2)).squeeze(2)
        if self.gram is None or self.gram.shape[0] != batch:
            self.gram, self.moment, self.pairs = torch.zeros_like(gram), torch.zeros_like(moment), 0
        self.gram = self.forget * self.gram + gram
        self.moment = self.forget * self.moment + moment
        self.pairs += 1

    def coefficients(self) -> torch.Tensor:
        """(a, b, c) per sample, [B, 3]; a small ridge keeps each 3×3 system solvable when features are
        collinear."""
        if self.gram is None:
            raise ValueError("LinearAG: the regression has no data yet")
        ridge = 1e-6 * self.gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
        eye = torch.eye(3, dtype=torch.float64).expand_as(self.gram)
        return torch.linalg.solve(self.gram + ridge[:, None, None] * eye, self.moment)


@dataclass
class AdaptiveState:
    """Run-scoped state of Adaptive Guidance / LinearAG (one sampler call)."""

    switched: dict[str, int] = field(default_factory=dict)  # name → evaluation at which the last sample stopped it
    rows_off: dict[str, torch.Tensor] = field(default_factory=dict)  # name → [B] bool: samples that stopped it
    pending_off: dict[str, torch.Tensor] = field(default_factory=dict)  # rows to treat as stopped in this combine
    last_cosine: dict[str, float] = field(default_factory=dict)  # smallest cosine of the batch at the last check
    evaluations: int = 0
    true_uncond: int = 0
    since_true_uncond: int = 0
    estimated: int = 0
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (ε_c, ε_u) of the previous evaluation
    fit: LinearFit = field(default_factory=LinearFit)


def is_switched(state: AdaptiveState, name: str) -> bool:
    """Whether ``name`` is off for the whole batch (its model pass is no longer run)."""
    return name in state.switched


def wants_estimate(state: AdaptiveState, calibration_steps: int, refresh_every: int) -> bool:
    """LinearAG: estimate the uncond at this evaluation instead of running it."""
    if state.previous is None or state.fit.pairs == 0 or state.true_uncond < calibration_steps:
        return False
    return state.since_true_uncond + 1 < refresh_every


def stage_row_masks(state: AdaptiveState, batch: int) -> None:
    """Before this evaluation's switches are updated: the rows stopped at earlier evaluations, which this
    evaluation's combine treats as conditional-only (``apply_row_masks``)."""
    state.pending_off = {name: rows.clone() for name, rows in state.rows_off.items()
                         if name not in state.switched and rows.shape[0] == batch and bool(rows.any())}


def observe(state: AdaptiveState, threshold: float, watch: tuple[str, ...], x: torch.Tensor, sigma,
            cond: torch.Tensor, others: dict[str, torch.Tensor], parameterization: str = "ve") -> None:
    """Update the one-way per-sample switches from this evaluation's true predictions (``others``: name → D).

    Skipped where the noise prediction carries no information about D: on flow models at σ = 1 (α = 0)
    ε̂ = x for every prediction, a cosine of exactly 1 that says nothing about convergence."""
    if float(signal_scale(sigma, x, parameterization).min()) < 1e-3:
        return
    for name, prediction in others.items():
        if name not in watch or name in state.switched:
            continue
        gamma = guidance_cosine(x, cond, prediction, sigma, parameterization).cpu()
        state.last_cosine[name] = float(gamma.min())
        rows = state.rows_off.get(name)
        if rows is None or rows.shape[0] != gamma.shape[0]:
            rows = torch.zeros(gamma.shape[0], dtype=torch.bool)
        rows = rows | (gamma >= threshold)
        state.rows_off[name] = rows
        if bool(rows.all()):
            state.switched[name] = state.evaluations


def apply_row_masks(state: AdaptiveState, cond: torch.Tensor, uncond: torch.Tensor | None,
                    branches: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The uncond and branch predictions with the rows of samples that stopped them replaced by the cond rows
    (consumes the masks staged for this evaluation). With U = C a sample's guided prediction is C under every
    plan stage, as when the uncond is not evaluated at all."""
    masks, state.pending_off = state.pending_off, {}
    if not masks:
        return uncond, branches

    def masked(name: str, prediction: torch.Tensor) -> torch.Tensor:
        rows = masks.get(name)
        if rows is None or rows.shape[0] != prediction.shape[0]:
            return prediction
        where = rows.to(prediction.device).reshape((-1,) + (1,) * (prediction.ndim - 1))
        return torch.where(where, cond.to(prediction.dtype), prediction)

    if uncond is not None:
        uncond = masked(UNCOND, uncond)
    return uncond, {name: masked(name, p) for name, p in branches.items()}


def record_uncond(state: AdaptiveState, x: torch.Tensor, sigma, cond: torch.Tensor, uncond: torch.Tensor,
                  true_evaluation: bool, fit: bool) -> None:
    """LinearAG bookkeeping after an evaluation whose uncond was run (or estimated)."""
    eps_c = model_output(x, cond, sigma)
    eps_u = model_output(x, uncond, sigma)
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
    """LinearAG's Û = x − σ·(a·f_c + b·f_u,prev + c·f_c,prev) (per sample, f = (x − D)/σ), in the dtype of
    ``cond``."""
    if state.previous is None or state.fit.pairs == 0:
        raise ValueError("LinearAG: no calibrated regression yet (needs two evaluated steps)")
    coefficients = state.fit.coefficients()
    if coefficients.shape[0] != x.shape[0]:
        raise ValueError(f"LinearAG: the regression was fitted on a batch of {coefficients.shape[0]}, this "
                         f"evaluation has {x.shape[0]} samples")
    a, b, c = (coefficients[:, i].float().to(x.device).reshape((-1,) + (1,) * (x.ndim - 1)) for i in range(3))
    eps_c = model_output(x, cond, sigma)
    prev_c, prev_u = state.previous
    eps_u = a * eps_c + b * prev_u + c * prev_c
    return (to_f32(x) - per_sample(sigma, x) * eps_u).to(cond.dtype)


def finish_evaluation(state: AdaptiveState) -> None:
    state.evaluations += 1
