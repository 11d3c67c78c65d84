"""Inputs of degraded branches that are not attention operators (pure torch).

* ICG (Sadat et al., "No Training, No Problem: Rethinking Classifier-Free Guidance for Diffusion
  Models", ICLR 2025): the unconditional prediction is replaced by the prediction under a condition
  independent of the data. For text encoders we draw a random embedding with the statistics of the
  prompt's own embedding (per channel mean and std over its tokens), so it stays on the scale the
  model was trained on while carrying no information about the prompt.
* TSG (same paper): the conditional prediction at a perturbed time step. We perturb the model's
  time input (hence its time embedding) by Gaussian noise scaled to the model's time range.
"""

from __future__ import annotations

import torch


def independent_embedding(reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian tokens [B, L, C] with the per-channel mean/std of ``reference`` over its tokens.

    Drawn on the CPU from ``generator`` (reproducible across devices), returned in the reference's
    dtype and device. A reference with a single token gets the std over its channels instead.
    """
    if reference.ndim < 2:
        raise ValueError(f"ICG: expected a conditioning tensor [batch, tokens, channels], got {tuple(reference.shape)}")
    ref = reference.detach().float().cpu()
    mean = ref.mean(dim=-2, keepdim=True)
    if ref.shape[-2] > 1:
        std = ref.std(dim=-2, keepdim=True)
    else:
        std = ref.std(dim=-1, keepdim=True).expand_as(ref)
    noise = torch.randn(ref.shape, generator=generator)
    return (mean + std * noise).to(device=reference.device, dtype=reference.dtype)


def perturbed_timesteps(t: torch.Tensor, noise: torch.Tensor, size: float, low: float, high: float) -> torch.Tensor:
    """TSG: ``t + size·(high − low)·n``, clamped to the model's time range [low, high].

    ``t`` is the model's own time input (UNet: 0–999, SD3/WAN: σ·1000, Flux: σ); ``noise`` holds
    one standard-normal value per row. ``size`` 0 returns ``t`` unchanged.
    """
    if size == 0:
        return t
    lo, hi = min(low, high), max(low, high)
    shifted = t.float() + size * (hi - lo) * noise.to(t.device, torch.float32).reshape(t.shape)
    return shifted.clamp(lo, hi).to(t.dtype)
