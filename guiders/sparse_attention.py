"""Attention maps other than the model's softmax, pure torch.

PLADIS (Kim & Sim, ICCV 2025, arXiv 2503.07677) replaces a cross-attention's softmax map ``A₁ = softmax(QKᵀ/√d)`` by
``A = A₁ + λ·(A_α − A₁)``, with ``A_α = α-entmax(QKᵀ/√d)`` (α = 1.5) or sparsemax (α = 2): its output is
``A·V = O₁ + λ·(O_α − O₁)``, so the model's own attention (O₁) is kept and only O_α is computed here.
α-entmax comes from the ``entmax`` package (Peters, Niculae & Martins, the reference implementation).

ERG (Ifriqi et al., NeurIPS 2025, arXiv 2504.13987): the weak branch's self-attention at a higher temperature
(``tempered_attention``).
"""

from __future__ import annotations

import torch

SPARSE_FUNCTIONS = ("entmax1.5", "sparsemax")


def sparse_probabilities(logits: torch.Tensor, function: str) -> torch.Tensor:
    """α-entmax (``entmax1.5``) or sparsemax of ``logits`` over the last dimension (float32)."""
    from entmax import entmax15, sparsemax

    if function == "entmax1.5":
        return entmax15(logits.float(), dim=-1)
    if function == "sparsemax":
        return sparsemax(logits.float(), dim=-1)
    raise ValueError(f"unknown sparse attention function {function!r}; expected one of {SPARSE_FUNCTIONS}")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, function: str,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sparse(QKᵀ/√d + mask)·V`` for [B, H, L, D] inputs; ``mask``: boolean (True = attend) or additive,
    broadcastable to [B, H, Lq, Lk]. Returned in ``v``'s dtype."""
    scale = q.shape[-1] ** -0.5
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    probabilities = sparse_probabilities(logits, function)
    return torch.matmul(probabilities, v.float()).to(v.dtype)


def pladis_extrapolate(dense: torch.Tensor, sparse: torch.Tensor, scale: float) -> torch.Tensor:
    """``O₁ + λ·(O_α − O₁)``: λ = 1 is the sparse attention itself, λ = 0 the dense one."""
    return torch.lerp(dense, sparse.to(dense.dtype), scale) if scale != 1.0 else sparse.to(dense.dtype)


def tempered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: float,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(QKᵀ/(τ√d) + mask)·V`` for [B, H, L, D] inputs: ERG's attention at temperature τ (τ > 1 flattens
    the map, raising its entropy; τ → ∞ is the mean of the values; τ = 1 the plain attention)."""
    scale = q.shape[-1] ** -0.5 / temperature
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
