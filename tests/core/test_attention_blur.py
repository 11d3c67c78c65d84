"""SAG's degradation (guiders/attention_blur.py): attention scores, token grids, the masked blur; dtypes, batch,
bad input."""

import pytest
import torch

from guidance_kit.guiders.attention_blur import (
    TokenGridError,
    attention_scores,
    blur_attended,
    gaussian_blur,
    image_attention_scores,
    token_grid,
)


def reference_scores(q, k, heads):
    """Loop over samples and heads: softmax(q·kᵀ/√d), mean over heads, sum over queries."""
    b, n, inner = q.shape
    d = inner // heads
    out = torch.zeros(b, n)
    for i in range(b):
        for h in range(heads):
            qh, kh = q[i, :, h * d:(h + 1) * d].double(), k[i, :, h * d:(h + 1) * d].double()
            out[i] += ((qh @ kh.T) / d ** 0.5).softmax(-1).sum(0).float() / heads
    return out


def test_scores_equal_a_per_head_loop_and_sum_to_the_token_count():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 20, 16, generator=g), torch.randn(3, 20, 16, generator=g)
    scores = attention_scores(q, k, heads=4)
    torch.testing.assert_close(scores, reference_scores(q, k, 4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.sum(-1), torch.full((3,), 20.0))  # each query's row sums to 1


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_scores_chunked_equal_the_whole_map(chunk, dtype):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 20, 4, generator=g), torch.randn(2, 4, 20, 4, generator=g)  # [B, heads, N, d]
    flat = [t.transpose(1, 2).reshape(2, 20, 16) for t in (q, k)]
    scores = image_attention_scores(q.to(dtype), k.to(dtype), chunk=chunk)
    assert scores.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(scores, reference_scores(*flat, 4), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(scores.sum(-1), torch.full((2,), 20.0))


def test_flux_patch_grid_is_found_for_odd_latent_sides():
    assert token_grid(5 * 4, 9, 7) == (5, 4)  # Flux/SD3 pad a 9 × 7 latent to 2 × 2 patches: 5 × 4 tokens


def test_token_grid_finds_the_unet_level_including_odd_sides():
    assert token_grid(64, 64, 64) == (8, 8)
    assert token_grid(12, 24, 32) == (3, 4)
    assert token_grid(4 * 6, 13, 21) == (4, 6)  # ceil at each halving: 13 → 7 → 4, 21 → 11 → 6
    with pytest.raises(TokenGridError, match="7 attention tokens do not tile a 16×16 latent"):
        token_grid(7, 16, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blur_keeps_a_constant_image_and_preserves_the_dtype(dtype):
    flat = torch.full((2, 4, 12, 10), 0.75, dtype=dtype)
    blurred = gaussian_blur(flat, 1.0)
    assert blurred.dtype == dtype and blurred.shape == flat.shape
    torch.testing.assert_close(blurred.float(), flat.float(), rtol=1e-2, atol=1e-2)


def test_only_the_attended_tokens_are_blurred_per_sample():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    scores = torch.zeros(2, 16)
    scores[0, 0] = 3.0  # sample 0: only the top-left 4×4 cell is attended; sample 1: nothing
    out = blur_attended(x0, scores, 2.0, 1.0)
    torch.testing.assert_close(out[0, :, :4, :4], gaussian_blur(x0, 2.0)[0, :, :4, :4])
    assert torch.equal(out[0, :, 4:], x0[0, :, 4:]) and torch.equal(out[0, :, :4, 4:], x0[0, :, :4, 4:])
    assert torch.equal(out[1], x0[1])
    everywhere = blur_attended(x0, torch.full((2, 16), 2.0), 2.0, 1.0)
    torch.testing.assert_close(everywhere, gaussian_blur(x0, 2.0))


def test_a_map_that_does_not_tile_the_latent_is_refused():
    with pytest.raises(TokenGridError):
        blur_attended(torch.zeros(1, 4, 16, 16), torch.zeros(1, 10), 1.0, 1.0)
