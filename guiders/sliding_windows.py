"""Sliding Window Guidance's windows and stitch (Kaiser et al., arXiv 2411.10257), pure torch.

The weak prediction is the model applied to overlapping crops of the latent, stitched back: every position
gets the mean of the crops' predictions that cover it. The crops act on the last two (spatial) dimensions,
so video latents [B, C, T, H, W] are cropped per frame grid, all frames together.
"""

from __future__ import annotations

import torch


def window_starts(size: int, window: int, count: int, align: int = 1) -> list[int]:
    """``count`` start offsets of windows of ``window`` cells spread evenly from 0 to ``size − window``, multiples
    of ``align`` (the model's patch size); the last window ends at ``size``."""
    if window >= size:
        return [0]
    last = size - window
    starts = sorted({min(last, round(last * i / max(count - 1, 1) / align) * align) for i in range(count)})
    if starts[-1] != last:
        starts[-1] = last
    return starts


def crop_windows(height: int, width: int, fraction: float, per_side: int, align: int = 1
                 ) -> list[tuple[slice, slice]]:
    """The crops (row slice, column slice): each side ``fraction`` of the latent's (a multiple of ``align``, at
    least ``align``), ``per_side`` windows per axis."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"crop fraction must be in (0, 1], not {fraction}")
    h = max(align, int(height * fraction) // align * align)
    w = max(align, int(width * fraction) // align * align)
    return [(slice(y, y + min(h, height)), slice(x, x + min(w, width)))
            for y in window_starts(height, h, per_side, align) for x in window_starts(width, w, per_side, align)]


def crop(x: torch.Tensor, windows: list[tuple[slice, slice]]) -> torch.Tensor:
    """The crops of every row, window-major: [N·B, ..., h, w] (all windows must have one size)."""
    return torch.cat([x[..., rows, cols] for rows, cols in windows], dim=0)


def stitch(pieces: torch.Tensor, windows: list[tuple[slice, slice]], like: torch.Tensor) -> torch.Tensor:
    """Window-major crop predictions [N·B, ..., h, w] back onto ``like``'s shape: the mean over covering windows."""
    total = torch.zeros_like(like)
    count = torch.zeros(like.shape[-2:], dtype=like.dtype, device=like.device)
    for piece, (rows, cols) in zip(pieces.chunk(len(windows), dim=0), windows):
        total[..., rows, cols] += piece
        count[rows, cols] += 1
    if (count == 0).any():
        raise ValueError("the crop windows do not cover the whole latent")
    return total / count
