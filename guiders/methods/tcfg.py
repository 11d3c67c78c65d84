"""TCFG · Tangential Damping CFG: the uncond score keeps only its component along the dominant direction
of span{a, b} (stage 1, an uncond rewrite; then ordinary CFG on U').

Paper: Kwon et al., "TCFG: Tangential Damping Classifier-free Guidance", CVPR 2025 (arXiv 2503.18137).
With scores ``a = x − U`` and ``b = x − C`` flattened per sample, stack ``M = [a; b]`` (2×d), take its
first right singular vector ``v₁`` and set

    a' = ⟨a, v₁⟩·v₁,    U' = x − a'

It acts on the model-output space ``(x − D)/σ`` (ε on eps models, the velocity on flow models); the
result does not depend on the sign of ``v₁`` nor on a common scale of a and b, so σ cancels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, UncondRewrite
from ..tensor_ops import batch_dot, per_sample, to_f32

if TYPE_CHECKING:
    from ..step import StepInputs


def tangential_damping(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """U' of TCFG, computed without an SVD of the 2×d matrix.

    With ``e`` the top eigenvector of the 2×2 Gram matrix ``G = M Mᵀ`` (eigenvalue λ), ``v₁ = Mᵀe/√λ``
    and ``⟨a, v₁⟩v₁ = e₀·(e₀a + e₁b)``, which is exact and costs two dot products per sample.
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


@dataclass(frozen=True)
class TCFG(UncondRewrite):
    """TCFG has no settings; it rewrites U after a second-model blend and before CFG-Zero*'s α*."""

    KEY = "tcfg"
    ORDER = 10
    AT_CFG_ONE = CfgOne.REWRITES_UNCOND

    label: str = "TCFG"

    def rewrite_uncond(self, inp: StepInputs, uncond: torch.Tensor) -> torch.Tensor:
        return tangential_damping(inp.x, inp.cond, uncond)
