"""SEG's query blur against the official code's rules (SusungHong/SEG-SDXL, pipeline_seg.py):
kernel size ceil(6σ)+1−ceil(6σ) mod 2 (1 = identity for σ ≤ 1/6), the clamp min(k, n − (n mod 2 − 1)),
reflect padding, a normalised Gaussian, the infinite blur strictly above 9999 as the mean query, and on
video both the finite and the infinite blur per frame."""

import math

import pytest
import torch
import torch.nn.functional as F

from guidance_kit.guiders import attention_ops as ops


def reference_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """The official formula written out: [C, H, W] (square), kernel from ceil(6σ), reflect padding."""
    six = math.ceil(6 * sigma)
    size = six + 1 - six % 2
    height = image.shape[-1]
    size = min(size, height - (height % 2 - 1))
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel1d = (pdf / pdf.sum()).to(image.dtype)
    kernel = (kernel1d[:, None] * kernel1d[None, :]).expand(image.shape[0], 1, size, size)
    padded = F.pad(image[None], [size // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=image.shape[0])[0]


def tokens_to_image(x: torch.Tensor, grid) -> torch.Tensor:  # [1, 1, L, D] → [D, h, w]
    return x[0, 0].T.reshape(x.shape[-1], *grid)


@pytest.mark.parametrize("sigma", [0.3, 0.7, 1.0, 2.5, 40.0])
@pytest.mark.parametrize("side", [6, 7])
def test_finite_blur_equals_the_official_formula(sigma, side):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, side * side, 5, generator=g, dtype=torch.float64)
    ours = ops.blur_grid_tokens(x, (side, side), sigma)
    expected = reference_blur(tokens_to_image(x, (side, side)), sigma)
    assert torch.allclose(tokens_to_image(ours, (side, side)), expected, atol=1e-6)


@pytest.mark.parametrize("sigma", [1e-3, 0.1, 1 / 6])
def test_sigma_up_to_one_sixth_is_the_identity(sigma):
    x = torch.randn(2, 2, 36, 4)
    assert torch.equal(ops.blur_grid_tokens(x, (6, 6), sigma), x)
    assert not torch.allclose(ops.blur_grid_tokens(x, (6, 6), 0.2), x)  # 3-wide kernel from σ > 1/6


def test_infinite_blur_starts_strictly_above_9999():
    x = torch.randn(1, 1, 64, 3)
    mean = x.mean(dim=2, keepdim=True).expand_as(x)
    assert torch.allclose(ops.blur_grid_tokens(x, (8, 8), 9999.5), mean, atol=1e-6)
    at_threshold = ops.blur_grid_tokens(x, (8, 8), 9999.0)  # finite: a kernel clamped to the grid, reflect-padded
    assert not torch.allclose(at_threshold, mean, atol=1e-4)
    assert torch.allclose(tokens_to_image(at_threshold, (8, 8)), reference_blur(tokens_to_image(x, (8, 8)), 9999.0),
                          atol=1e-5)


def test_infinite_blur_on_video_takes_each_frames_own_mean():
    frames, h, w = 3, 4, 5
    x = torch.randn(1, 2, frames * h * w, 3)
    x[:, :, h * w:2 * h * w] += 10.0  # frame 1 far from the others
    out = ops.blur_grid_tokens(x, (frames, h, w), float("inf"))
    for f in range(frames):
        part = slice(f * h * w, (f + 1) * h * w)
        assert torch.allclose(out[:, :, part], x[:, :, part].mean(dim=2, keepdim=True).expand_as(x[:, :, part]),
                              atol=1e-5)
    assert not torch.allclose(out[:, :, :h * w], out[:, :, h * w:2 * h * w])  # no cross-frame mean
    # consistent with the finite blur: a very wide finite blur of a constant-per-frame input keeps each frame
    step = torch.arange(frames).repeat_interleave(h * w).float()[None, None, :, None].expand(1, 1, -1, 2)
    assert torch.allclose(ops.blur_grid_tokens(step, (frames, h, w), 50.0), step, atol=1e-5)
    assert torch.allclose(ops.blur_grid_tokens(step, (frames, h, w), float("inf")), step, atol=1e-6)


def test_infinite_blur_is_one_attention_row_per_frame_not_a_uniform_map():
    """All queries of a frame become the frame's mean query, so they share one attention row
    softmax(q̄·kᵀ/√d), which is not the uniform map 1/L over the keys."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 16, 8, generator=g) * 3 for _ in range(3))
    out = ops.smoothed_energy_attention(q, k, v, (4, 4), float("inf"))
    assert torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-6)
    uniform = v.mean(dim=2, keepdim=True).expand_as(v)
    assert not torch.allclose(out, uniform, atol=1e-3)
