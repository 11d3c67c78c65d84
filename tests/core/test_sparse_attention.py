"""PLADIS's sparse attention (guiders/sparse_attention.py): sparsemax against its closed form (sorted
threshold), α-entmax's fixed point, masks, dtypes, batches and the extrapolation's end points."""

import pytest
import torch

from guidance_kit.guiders.sparse_attention import pladis_extrapolate, sparse_attention, sparse_probabilities


def sparsemax_closed_form(z: torch.Tensor) -> torch.Tensor:
    """Martins & Astudillo (2016), Alg. 1: τ from the sorted logits, p = max(z − τ, 0)."""
    zs, _ = z.sort(dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cumulative = zs.cumsum(-1)
    support = (1 + k * zs > cumulative).sum(-1, keepdim=True)
    tau = (cumulative.gather(-1, support - 1) - 1) / support
    return (z - tau).clamp_min(0)


def test_sparsemax_matches_its_closed_form_and_is_sparse():
    z = torch.randn(3, 4, 7, 9, generator=torch.Generator().manual_seed(0)) * 3
    p = sparse_probabilities(z, "sparsemax")
    torch.testing.assert_close(p, sparsemax_closed_form(z), atol=1e-6, rtol=0)
    assert (p == 0).any()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 4, 7))


def test_entmax15_is_its_fixed_point():
    """α = 1.5: p = [(z/2 − τ)]₊², with Σp = 1 (Peters et al., 2019)."""
    z = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1)) * 4
    p = sparse_probabilities(z, "entmax1.5")
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 5))
    support = p > 0
    tau = z / 2 - p.sqrt()  # on the support: one threshold τ per row
    spread = torch.where(support, tau, -torch.inf).amax(-1) - torch.where(support, tau, torch.inf).amin(-1)
    assert spread.abs().max() < 1e-5
    assert (z / 2 <= torch.where(support, tau, torch.inf).amin(-1, keepdim=True) + 1e-5)[~support].all()
    assert (p == 0).any()
    dense = z.softmax(-1)
    assert (p.max(-1).values >= dense.max(-1).values - 1e-6).all()  # sparser: at least as peaked as softmax


def test_sparse_attention_with_masks_and_batches():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(3))
    keep = torch.ones(3, 1, 1, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False
    additive = torch.zeros(3, 1, 1, 5).masked_fill(~keep, float("-inf"))
    with_bool = sparse_attention(q, k, v, "entmax1.5", keep)
    torch.testing.assert_close(with_bool, sparse_attention(q, k, v, "entmax1.5", additive))
    torch.testing.assert_close(with_bool[1:2], sparse_attention(q[1:2], k[1:2, :, :3], v[1:2, :, :3], "entmax1.5"))
    for row in range(3):  # batch rows are independent
        torch.testing.assert_close(sparse_attention(q, k, v, "sparsemax")[row],
                                   sparse_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], "sparsemax")[0])


def test_a_single_key_is_the_identity():
    """One key (a one-token context): every attention map is 1, so PLADIS leaves the output unchanged."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 2, 6, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4,
                                                                                                         generator=g)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(pladis_extrapolate(dense, sparse_attention(q, k, v, "entmax1.5"), 2.0), dense)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_extrapolation_end_points_and_dtypes(dtype):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g).to(dtype) for _ in range(3))
    sparse = sparse_attention(q, k, v, "entmax1.5")
    assert sparse.dtype == dtype and torch.isfinite(sparse).all()
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype)
    assert torch.equal(pladis_extrapolate(dense, sparse, 0.0), dense)
    assert torch.equal(pladis_extrapolate(dense, sparse, 1.0), sparse)
    torch.testing.assert_close(pladis_extrapolate(dense.float(), sparse.float(), 2.0),
                               2 * sparse.float() - dense.float())


def test_unknown_function_is_refused():
    with pytest.raises(ValueError, match="unknown sparse attention function"):
        sparse_probabilities(torch.zeros(1, 3), "softmax")


def test_tempered_attention_is_softmax_of_scaled_logits():
    from guidance_kit.guiders.sparse_attention import tempered_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    logits = q @ k.transpose(-1, -2) / 8 ** 0.5
    torch.testing.assert_close(tempered_attention(q, k, v, 3.0), (logits / 3.0).softmax(-1) @ v)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(tempered_attention(q, k, v, 1.0), plain)
    flat = tempered_attention(q, k, v, 1e6)  # τ → ∞: every query gets the mean value
    torch.testing.assert_close(flat, v.mean(-2, keepdim=True).expand_as(flat), atol=1e-4, rtol=0)
