"""Per-sample reductions shared by every guidance rule.

Every norm, dot product and projection in this pack is taken **per sample over all non-batch
dimensions** (C,H,W for images, C,T,H,W for video latents) and computed in float32, so fp16/bf16
inputs neither overflow nor lose the result. Results are returned in the caller's dtype by the
functions that produce predictions; the reductions here always return float32.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def sample_dims(t: torch.Tensor) -> tuple[int, ...]:
    """All dimensions but the batch dimension."""
    return tuple(range(1, t.ndim))


def to_f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def per_sample(values: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a [B] tensor (e.g. sigma) to the shape [B, 1, 1, ...] of ``like``."""
    v = torch.as_tensor(values, dtype=torch.float32, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    v = v.reshape(-1)
    if v.shape[0] == 1 and like.shape[0] != 1:
        v = v.expand(like.shape[0])
    if v.shape[0] != like.shape[0]:
        raise ValueError(f"per-sample values have {v.shape[0]} entries for a batch of {like.shape[0]}")
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> per sample, float32, shape [B, 1, ...]."""
    return (to_f32(a) * to_f32(b)).sum(dim=sample_dims(a), keepdim=True)


def batch_norm(a: torch.Tensor) -> torch.Tensor:
    """||a||_2 per sample, float32, shape [B, 1, ...]."""
    return to_f32(a).square().sum(dim=sample_dims(a), keepdim=True).sqrt()


def batch_std(a: torch.Tensor) -> torch.Tensor:
    """Standard deviation per sample (unbiased, as torch.std), float32, shape [B, 1, ...]."""
    return to_f32(a).std(dim=sample_dims(a), keepdim=True)


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, with 0 where den is 0 (a zero vector has no direction)."""
    safe = torch.where(den.abs() > EPS, den, torch.ones_like(den))
    return torch.where(den.abs() > EPS, num / safe, torch.zeros_like(num))

