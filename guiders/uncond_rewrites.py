"""Rewrites of the unconditional prediction (stage 1 of the combine): TCFG and CFG-Zero*.

Both act on the model-output space ``p = (x − D)/σ`` (ε for eps models, velocity for flow models),
not on the denoised predictions; ``D`` is a denoised (x0) prediction, ``x`` the noisy input.
A rewritten uncond ``U'`` is then used by ordinary CFG ``U' + w·(C − U')``.
"""

from __future__ import annotations

import torch

from .tensor_ops import batch_dot, per_sample, to_f32


def tangential_damping(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """TCFG: the uncond score keeps only its component along the dominant direction of span{a, b}.

    Paper: Kwon et al., "TCFG: Tangential Damping Classifier-free Guidance", CVPR 2025
    (arXiv 2503.18137). With scores ``a = x − U`` and ``b = x − C`` flattened per sample, stack
    ``M = [a; b]`` (2×d), take its first right singular vector ``v₁`` and set
    ``a' = ⟨a, v₁⟩·v₁``, ``U' = x − a'``.

    Computed without an SVD of the 2×d matrix: with ``e`` the top eigenvector of the 2×2 Gram
    matrix ``G = M Mᵀ`` (eigenvalue λ), ``v₁ = Mᵀe/√λ`` and ``⟨a, v₁⟩v₁ = e₀·(e₀a + e₁b)``,
    which is exact and costs two dot products per sample. The result does not depend on the
    sign of ``v₁`` nor on a common scale of a and b (so σ-scaling is irrelevant).
    """
    a = to_f32(x) - to_f32(uncond)
    b = to_f32(x) - to_f32(cond)
    gram = torch.stack([
        torch.stack([batch_dot(a, a).flatten(), batch_dot(a, b).flatten()], dim=-1),
        torch.stack([batch_dot(a, b).flatten(), batch_dot(b, b).flatten()], dim=-1),
    ], dim=-2).double()
    _, vectors = torch.linalg.eigh(gram)
    top = vectors[..., -1]  # eigenvalues ascend: the last column is the dominant direction
    e0 = per_sample(top[:, 0].float(), a)
    e1 = per_sample(top[:, 1].float(), a)
    a_damped = e0 * (e0 * a + e1 * b)
    return (to_f32(x) - a_damped).to(uncond.dtype)


def optimized_scale(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                    sigma: torch.Tensor | float) -> torch.Tensor:
    """CFG-Zero*'s α* = ⟨v_c, v_u⟩ / (‖v_u‖² + 1e−8) per sample, with v = (x − D)/σ (float32, [B,1,...]).

    Paper: Fan, Zheng, Yeh, Liu, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching
    Models", arXiv 2503.18886 (official code computes it on the velocity prediction, per sample).
    """
    s = per_sample(sigma, x)
    v_c = (to_f32(x) - to_f32(cond)) / s
    v_u = (to_f32(x) - to_f32(uncond)) / s
    return batch_dot(v_c, v_u) / (batch_dot(v_u, v_u) + 1e-8)


def scale_uncond_velocity(x: torch.Tensor, uncond: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """U' with ``x − U' = α·(x − U)``, i.e. the uncond velocity/ε scaled by α.

    CFG on (C, U') reproduces the paper's ``v̂ = α·v_u + w·(v_c − α·v_u)`` exactly; in x0 space
    ``D̂ = w·C + α(1 − w)·U + (1 − α)(1 − w)·x``. (ComfyUI core's CFGZeroStar node drops the last
    term, which is why it differs from the paper.)
    """
    return (alpha * to_f32(uncond) + (1.0 - alpha) * to_f32(x)).to(uncond.dtype)
