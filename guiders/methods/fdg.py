"""FDG · Frequency-Decoupled Guidance: one CFG weight per Laplacian band (stage 2, the band split).

Paper: Sadat, Vontobel, Salehi, Weber, "Guidance in the Frequency Domain Enables High-Fidelity
Sampling at Low CFG Scales", arXiv 2506.19713; reference port: diffusers ``FrequencyDecoupledGuidance``.
For bands l = 0 … L−1 (high → low frequency) of C and g = C − U':

    G_l = U_l + w_l·g_l,    D̂ = reconstruct(G_0 … G_{L−1})

with ``w_l`` the node's scales (the paper's rule: they replace the sampler's cfg) or, in the relative
mode, ``1 + (cfg − 1)·scale_l``. Every other stage-2 method acts per band (``combine.py``).

Levels are ordered **high → low** frequency like kornia's ``build_laplacian_pyramid``:
``ℓ_k = g_k − expand(g_{k+1})`` for k < L−1 and ``ℓ_{L−1} = g_{L−1}`` (the low-pass residual), with
``g_{k+1} = pyrdown(g_k)`` (kornia's 5×5 Gaussian blur then ↓2). ``expand`` is kornia's ``pyrup``
followed by an edge-replicate pad when a side is odd, so any latent size works and
``reconstruct(laplacian_pyramid(t)) == t`` up to float rounding. Video latents (B,C,T,H,W) are
split per frame (time folded into the batch); the pyramid is spatial only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.geometry.transform import pyrdown, pyrup

from ..plan import BandSplit, CfgOne, GuidancePlan, Note, PlanError
from ..tensor_ops import to_f32


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


@dataclass(frozen=True)
class FDG(BandSplit):
    """One CFG weight per Laplacian level, high → low frequency.

    ``relative`` False (the paper's and diffusers' rule): the scales are the band weights and the sampler's
    cfg is not used (so FDG acts at cfg 1 and needs the uncond there). True: band weight
    ``1 + (cfg − 1)·scale``, so the sampler's cfg sets the strength and the scales its split over the bands
    ("1, 0.5" at cfg 10: 10 and 5.5; cfg 1: no guidance).
    """

    KEY = "fdg"

    scales: tuple[float, ...] = (10.0, 5.0)
    label: str = "FDG"
    relative: bool = False

    def validate(self) -> None:
        if len(self.scales) < 2:
            raise PlanError(f"{self.label}: give one scale per frequency level, high → low, at least two "
                            f"(e.g. '10, 5'); got {list(self.scales)}")
        if len(self.scales) > 6:
            raise PlanError(f"{self.label}: at most 6 levels (latents are small); got {len(self.scales)}")
        if not all(math.isfinite(s) for s in self.scales):
            raise PlanError(f"{self.label}: scales must be finite numbers")

    def band_weights(self, cond_scale: float) -> tuple[float, ...]:
        """The CFG weight of each band at the sampler's cfg ``cond_scale``."""
        if self.relative:
            return tuple(1.0 + (cond_scale - 1.0) * s for s in self.scales)
        return self.scales

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return laplacian_pyramid(t, len(self.scales))

    def merge(self, bands: list[torch.Tensor]) -> torch.Tensor:
        return reconstruct(bands)

    def cfg_one(self, plan: GuidancePlan) -> CfgOne:
        return CfgOne.INACTIVE if self.relative else CfgOne.NEEDS_UNCOND

    def cfg_one_label(self) -> str:
        return self.label + (" (scales relative to cfg)" if self.relative else "")

    def cfg_notes(self, cond_scale: float) -> list[Note]:
        """A note when the sampler's cfg has no effect on FDG's bands (absolute scales, cfg not 1 and not the
        highest band's scale, i.e. not a value chosen to compare with plain CFG)."""
        if self.relative or math.isclose(cond_scale, 1.0) or math.isclose(cond_scale, self.scales[0]):
            return []
        scales = ", ".join(f"{s:g}" for s in self.scales)
        return [("fdg-ignores-cfg",
                 f"{self.label}: the sampler's cfg ({cond_scale:g}) does not change the guidance: FDG's scales "
                 f"'{scales}' are the CFG weights of its bands and replace cfg (paper/diffusers rule). To make cfg "
                 f"act, set the FDG node's scale_mode to 'relative to cfg' (band weight = 1 + (cfg − 1)·scale).")]
