"""Laplacian pyramids for frequency-decoupled guidance (FDG).

Paper: Sadat, Vontobel, Salehi, Weber, "Guidance in the Frequency Domain Enables High-Fidelity
Sampling at Low CFG Scales", arXiv 2506.19713 (FDG); reference port: diffusers
``FrequencyDecoupledGuidance``.

Levels are ordered **high → low** frequency like kornia's ``build_laplacian_pyramid``:
``ℓ_k = g_k − expand(g_{k+1})`` for k < L−1 and ``ℓ_{L−1} = g_{L−1}`` (the low-pass residual), with
``g_{k+1} = pyrdown(g_k)`` (kornia's 5×5 Gaussian blur then ↓2). ``expand`` is kornia's ``pyrup``
followed by an edge-replicate pad when a side is odd, so any latent size works and
``reconstruct(laplacian_pyramid(t)) == t`` up to float rounding. Video latents (B,C,T,H,W) are
split per frame (time folded into the batch); the pyramid is spatial only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry.transform import pyrdown, pyrup

from .tensor_ops import to_f32


def max_levels(height: int, width: int) -> int:
    """Most pyramid levels a latent of this spatial size supports (each blurred level ≥ 3 px)."""
    levels, h, w = 1, height, width
    while min(h, w) >= 3 and min(h // 2, w // 2) >= 2:
        levels += 1
        h, w = h // 2, w // 2
    return levels


def _fold_time(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    if t.ndim == 4:
        return t, None
    if t.ndim == 5:
        b, c, f, h, w = t.shape
        return t.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), (b, c, f, h, w)
    raise ValueError(f"FDG works on 4-D image latents (B,C,H,W) and 5-D video latents (B,C,T,H,W); got {t.ndim}-D")


def _unfold_time(t: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    if shape is None:
        return t
    b, c, f, h, w = shape
    return t.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def _expand(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    up = pyrup(t)
    pad_h, pad_w = size[0] - up.shape[-2], size[1] - up.shape[-1]
    if pad_h or pad_w:
        up = F.pad(up, (0, pad_w, 0, pad_h), mode="replicate")
    return up


def laplacian_pyramid(t: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Bands high → low, each in the input's layout (4-D, or 5-D with the same T), float32."""
    if levels < 1:
        raise ValueError(f"FDG needs at least 1 level (got {levels})")
    x, shape = _fold_time(to_f32(t))
    h, w = x.shape[-2:]
    if levels > max_levels(h, w):
        raise ValueError(f"FDG: a {h}×{w} latent supports at most {max_levels(h, w)} pyramid levels "
                         f"(asked for {levels}); use fewer levels")
    gaussians = [x]
    for _ in range(levels - 1):
        gaussians.append(pyrdown(gaussians[-1]))
    bands = [g - _expand(g_next, g.shape[-2:]) for g, g_next in zip(gaussians[:-1], gaussians[1:])]
    bands.append(gaussians[-1])
    return [_unfold_time(b, _with_size(shape, b)) for b in bands]


def reconstruct(bands: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``laplacian_pyramid``: expand the coarsest level and add the finer bands."""
    folded = [_fold_time(b) for b in bands]
    acc = folded[-1][0]
    for band, _ in reversed(folded[:-1]):
        acc = band + _expand(acc, band.shape[-2:])
    return _unfold_time(acc, folded[0][1])


def _with_size(shape: tuple[int, ...] | None, band: torch.Tensor) -> tuple[int, ...] | None:
    if shape is None:
        return None
    b, c, f = shape[:3]
    return (b, c, f, band.shape[-2], band.shape[-1])
