"""Self-Attention Guidance's degradation (Hong et al., ICCV 2023), plain torch: the per-token attention score of a
self-attention map, and x0 blurred where it exceeds a threshold (official ``sag_masking``; ComfyUI core's
``create_blur_map``): mask = mean over heads of the softmax map, summed over queries, ``> threshold``,
nearest-upsampled to the latent; a Gaussian blur (kernel 9, reflect padding) inside the mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLUR_KERNEL = 9
MIN_SIDE = BLUR_KERNEL // 2 + 1  # reflect padding needs sides above the half kernel


class TokenGridError(ValueError):
    pass


def attention_scores(q, k, heads: int, attn_precision=None) -> torch.Tensor:
    """``[B, N]``: per key token, the sum over queries of the head-mean softmax map of ``[B, N, heads·d]`` q, k."""
    b, _, inner = q.shape
    dim_head = inner // heads
    q, k = (t.reshape(b, -1, heads, dim_head).permute(0, 2, 1, 3).reshape(b * heads, -1, dim_head) for t in (q, k))
    if attn_precision == torch.float32:
        q, k = q.float(), k.float()
    attention = (torch.bmm(q, k.transpose(1, 2)) * dim_head ** -0.5).softmax(dim=-1)
    return attention.reshape(b, heads, *attention.shape[-2:]).mean(1).sum(1)


def image_attention_scores(q, k, chunk: int = 1024) -> torch.Tensor:
    """``[B, N]`` from ``[B, heads, N, d]`` image-token q, k: per key, the sum over queries of the head-mean softmax
    map over the image keys, computed ``chunk`` queries at a time (no N × N map is kept)."""
    q, k = q.float(), k.float()
    scale = q.shape[-1] ** -0.5
    scores = q.new_zeros(q.shape[0], k.shape[-2])
    for start in range(0, q.shape[-2], chunk):
        attention = (q[:, :, start:start + chunk] @ k.transpose(-1, -2) * scale).softmax(dim=-1)
        scores += attention.mean(1).sum(1)
    return scores


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of ``tokens`` attention tokens laid over a height × width latent (a UNet level)."""
    for level in range(0, 8):
        rows, cols = math.ceil(height / 2 ** level), math.ceil(width / 2 ** level)
        if rows * cols == tokens:
            return rows, cols
    raise TokenGridError(f"{tokens} attention tokens do not tile a {height}×{width} latent.")


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(device=image.device, dtype=image.dtype)
    channels = image.shape[-3]
    kernel = (weights[:, None] * weights[None, :]).expand(channels, 1, kernel_size, kernel_size)
    padded = F.pad(image, [kernel_size // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


def blur_attended(x0: torch.Tensor, scores: torch.Tensor, blur_sigma: float, threshold: float) -> torch.Tensor:
    """x0 blurred where the summed attention exceeds ``threshold`` (nearest-upsampled mask), unchanged elsewhere."""
    height, width = x0.shape[-2:]
    rows, cols = token_grid(scores.shape[-1], height, width)
    mask = (scores > threshold).reshape(x0.shape[0], 1, rows, cols).to(scores.dtype)
    mask = F.interpolate(mask, (height, width)).to(x0.dtype)
    return gaussian_blur(x0, blur_sigma) * mask + x0 * (1 - mask)
