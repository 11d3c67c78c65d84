"""Inputs of degraded branches that are not attention operators (pure torch).

Sadat, Kansy, Hilliges, Weber, "No Training, No Problem: Rethinking Classifier-Free Guidance for
Diffusion Models" (ICLR 2025, arXiv 2407.02687):

* ICG: the unconditional prediction is replaced by the prediction under a condition ŷ independent of
  the data, ``D = D(ŷ) + w·(D(y) − D(ŷ))``; the paper draws ŷ as Gaussian noise on the scale of the
  condition (or a random condition) at every sampling step. For a text encoder we draw tokens (and a
  pooled vector) with the statistics of the prompt's own (per channel over its tokens; over its
  channels for a pooled vector), so the condition stays on the scale the model was trained on while
  carrying no information about the prompt's content.
* TSG: the conditional prediction under a perturbed time-step *embedding*,
  ``t̃_emb = t_emb + s·t^α·n``, ``n ~ N(0, I)`` of the embedding's shape, and
  ``D = D(t̃_emb) + w·(D(t_emb) − D(t̃_emb))`` (``perturbed_time_embedding``). The pack's earlier
  variant shifts the scalar time input instead (``perturbed_timesteps``, kept as an option).

Every draw here takes its standard normal numbers from the caller, which draws one tensor per branch
and step (shared by the branch's rows): results do not depend on the batch size or a row's index.
"""

from __future__ import annotations

import torch


def standard_normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard normal numbers drawn on the CPU from ``generator`` (reproducible across devices)."""
    return torch.randn(tuple(shape), generator=generator)


def independent_embedding(reference: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """ICG's independent tokens: ``mean + std·noise`` with the per-channel mean/std of each row of
    ``reference`` [B, L, C] over its tokens.

    ``noise`` [L, C] or [1, L, C] (standard normal) is shared by every row, so a row's result depends
    on its own prompt statistics and the draw only, not on the batch. A reference with a single token
    gets the std over its channels instead. Returned in the reference's dtype and device.
    """
    if reference.ndim != 3:
        raise ValueError(f"ICG: expected a conditioning tensor [batch, tokens, channels], got {tuple(reference.shape)}")
    ref = reference.detach().float()
    mean = ref.mean(dim=-2, keepdim=True)
    if ref.shape[-2] > 1:
        std = ref.std(dim=-2, keepdim=True)
    else:
        std = ref.std(dim=-1, keepdim=True)
    n = noise.to(device=ref.device, dtype=torch.float32).reshape(1, *ref.shape[-2:])
    return (mean + std * n).to(dtype=reference.dtype)


def independent_vector(reference: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """ICG's independent pooled vector: ``mean + std·noise`` with each row's mean/std over its channels.

    ``reference`` [B, P] (a pooled text vector), ``noise`` [P] or [1, P] shared by the rows.
    """
    if reference.ndim != 2:
        raise ValueError(f"ICG: expected a pooled vector [batch, channels], got {tuple(reference.shape)}")
    ref = reference.detach().float()
    mean = ref.mean(dim=-1, keepdim=True)
    std = ref.std(dim=-1, keepdim=True) if ref.shape[-1] > 1 else ref.abs()
    n = noise.to(device=ref.device, dtype=torch.float32).reshape(1, ref.shape[-1])
    return (mean + std * n).to(dtype=reference.dtype)


def time_noise_size(t: float, s: float, alpha: float) -> float:
    """TSG's noise std ``s·t^α`` for the diffusion time ``t`` ∈ [0, 1] (0 = data, 1 = pure noise)."""
    if alpha < 0:
        raise ValueError(f"TSG: alpha must be ≥ 0 (got {alpha})")
    return float(s) * min(max(float(t), 0.0), 1.0) ** float(alpha)


def perturbed_time_embedding(embedding: torch.Tensor, noise: torch.Tensor, size: float) -> torch.Tensor:
    """TSG (Sadat et al. 2025, Sec. 5): ``t̃_emb = t_emb + size·n`` with ``size = s·t^α``.

    ``embedding`` [..., D] is the model's time-step embedding (rows of the TSG branch), ``noise`` [D]
    a standard normal vector broadcast over the leading dims (one draw per step, shared by the rows).
    Computed in float32, returned in the embedding's dtype; ``size`` 0 returns the embedding unchanged.
    """
    if size == 0:
        return embedding
    if noise.shape[-1] != embedding.shape[-1] or noise.numel() != embedding.shape[-1]:
        raise ValueError(f"TSG: noise of shape {tuple(noise.shape)} does not match the embedding's last dimension "
                         f"{embedding.shape[-1]}")
    n = noise.to(device=embedding.device, dtype=torch.float32).reshape(-1)
    return (embedding.float() + size * n).to(embedding.dtype)


def perturbed_timesteps(t: torch.Tensor, noise: torch.Tensor, size: float, low: float, high: float) -> torch.Tensor:
    """TSG's legacy time-input shift: ``t + size·(high − low)·n``, clamped to the model's time range.

    ``t`` is the model's own time input (UNet: 0–999, SD3/WAN: σ·1000, Flux: σ); ``noise`` holds
    one standard-normal value per row. ``size`` 0 returns ``t`` unchanged. Not the paper's
    perturbation (that is ``perturbed_time_embedding``): the branch denoises at another noise level.
    """
    if size == 0:
        return t
    lo, hi = min(low, high), max(low, high)
    shifted = t.float() + size * (hi - lo) * noise.to(t.device, torch.float32).reshape(t.shape)
    return shifted.clamp(lo, hi).to(t.dtype)
