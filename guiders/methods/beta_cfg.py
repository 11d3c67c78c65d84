"""β-CFG · Classifier-free Guidance with Adaptive Scaling: a guidance of fixed length shaped by a beta
curve over the run (stage 2, a weight factor).

Paper: Malarz, Kasymov, Zięba, Tabor, Spurek, "Classifier-free Guidance with Adaptive Scaling",
arXiv 2502.10574; official code gmum/beta-CFG (solver ``ddim_geo_beta``):

    ε̂ = ε_u + w·β(τ; a, b)·g/‖g‖^γ,    g = ε_c − ε_u

With ``g = (U − C)/σ`` (ε on eps/v models, the velocity on flow models) this multiplies the CFG weight by
``m = β(τ)·(σ/‖C − U‖)^γ`` per sample: ``W ← W·m``, ``D̂ = U + W·(C − U)``. τ is the run's progress
(ComfyUI's percent of σ). Its cfg is a guidance length, not a CFG scale, and it acts at cfg 1 (it needs
the uncond there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, Note, PlanError, WeightFactor
from ..schedules import beta_pdf, beta_peak
from ..tensor_ops import batch_norm, per_sample, safe_divide, to_f32

if TYPE_CHECKING:
    from ..step import DirectionInputs, GuidanceState

# β-CFG's normalisations of the guidance direction g = ε_c − ε_u (velocity on flow models)
BETA_NORM_RMS = "rms"  # per-element RMS, scaled to the paper's latent size: resolution-independent (default)
BETA_NORM_L2 = "l2"  # the paper's L2 norm over the whole latent
BETA_NORMS = (BETA_NORM_RMS, BETA_NORM_L2)
# the paper's latent size: SDXL at 1024² (the official latent_sdxl.py setting, cfg 7.5), 4·128·128 values
BETA_REFERENCE_ELEMENTS = 4 * 128 * 128
# at its peak (mid-run) acting below CFG 1, β-CFG pulls the result towards the unconditional prediction
BETA_WEAK_SCALE = 1.0


def beta_cfg_factor(cond: torch.Tensor, uncond: torch.Tensor, sigma: torch.Tensor | float, progress: float,
                    a: float, b: float, gamma: float, normalize_peak: bool = False,
                    normalization: str = BETA_NORM_L2,
                    reference_elements: int = BETA_REFERENCE_ELEMENTS) -> torch.Tensor:
    """β-CFG's per-sample multiplier m of the guidance weight: ``k = w·m``, ``D̂ = U + k·(C − U)``.

    ``normalization="l2"``, the paper's rule: ``m = β(τ)·(σ/‖C − U‖)^γ`` with the L2 norm per sample over
    all latent dims. With γ = 1 its guidance has a fixed L2 length ``w·β(τ)`` over the whole latent, so its
    strength per latent value scales as 1/√N with the latent size N: the same cfg is extreme on small
    latents and faint on large ones.

    ``normalization="rms"`` (the pack's resolution-independent rule) evaluates the paper's
    formula as if the latent had ``reference_elements`` values N_ref (default SDXL at 1024²):
    ``ε̂ = ε_u + w·β(τ)·g/(RMS(g)·√N_ref)^γ``, i.e. ``m_rms = m_l2·(N/N_ref)^(γ/2)``. Its
    per-element strength is the paper's at N_ref for every latent size, and the same on eps and
    flow models. Both are equal when N = N_ref.

    τ = ``progress`` (the official τ = step/(N − 1) for its own linear-timestep schedule).
    ``normalize_peak`` divides β by its maximum (the official optional normalisation). Returns float32
    [B, 1, ...]; a zero difference gets m = 0 (no direction to follow).
    """
    if normalization not in BETA_NORMS:
        raise ValueError(f"β-CFG: normalization must be one of {BETA_NORMS}; got {normalization!r}")
    curve = beta_pdf(progress, a, b)
    if normalize_peak:
        curve = curve / beta_peak(a, b)
    diff_norm = batch_norm(to_f32(cond) - to_f32(uncond))
    s = per_sample(sigma, cond)
    if gamma == 0:
        return torch.full_like(diff_norm, curve)
    factor = curve * safe_divide(s.expand_as(diff_norm), diff_norm).pow(gamma)
    if normalization == BETA_NORM_RMS:
        elements = cond[0].numel()
        factor = factor * (elements / float(reference_elements)) ** (gamma / 2.0)
    return factor


@dataclass(frozen=True)
class BetaCFG(WeightFactor):
    """β-CFG's settings: weight × β(τ; a, b)·(σ/‖C − U‖)^γ, times (N/N_ref)^(γ/2) in the
    resolution-independent ``normalization="rms"`` (default); ``"l2"`` is the paper's."""

    KEY = "beta_cfg"
    ORDER = 10  # before S-CFG's per-pixel factor
    AT_CFG_ONE = CfgOne.NEEDS_UNCOND

    a: float = 2.0
    b: float = 2.0
    gamma: float = 1.0
    normalize_peak: bool = False
    label: str = "β-CFG"
    normalization: str = BETA_NORM_RMS
    reference_elements: int = BETA_REFERENCE_ELEMENTS

    def validate(self) -> None:
        if self.a < 1 or self.b < 1:
            raise PlanError(f"{self.label}: a and b must be ≥ 1 (the beta density is infinite at the ends "
                            f"otherwise); got a={self.a}, b={self.b}")
        if not (0 <= self.gamma <= 2):
            raise PlanError(f"{self.label}: gamma must be in [0, 2] (got {self.gamma}); the paper uses 1")
        if self.normalization not in BETA_NORMS:
            raise PlanError(f"{self.label}: normalization must be 'rms' (per-element, resolution-independent) or "
                            f"'l2' (the paper's); got {self.normalization!r}")
        if self.reference_elements < 1:
            raise PlanError(f"{self.label}: reference_elements must be ≥ 1 (got {self.reference_elements})")

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        progress = direction.step.position.progress
        factor = beta_cfg_factor(direction.cond, direction.uncond, direction.step.sigma, progress, self.a, self.b,
                                 self.gamma, self.normalize_peak, self.normalization, self.reference_elements)
        weights = [w * factor for w in weights]
        # (progress, the CFG scale its weight amounts to, lowest over the batch), read by ``step_notes``
        direction.state.method_state[self.KEY] = (progress, float(torch.as_tensor(weights[0]).min()))
        return weights

    def step_notes(self, state: GuidanceState, cond_scale: float) -> list[Note]:
        """β-CFG's cfg is a guidance length, not a CFG scale: say so when, at its peak (mid-run), it amounts to
        a CFG scale below 1, i.e. the image is pulled towards the unconditional prediction."""
        seen = state.method_state.get(self.KEY)
        if seen is None or not 0.35 <= seen[0] <= 0.65:
            return []
        effective = seen[1]
        if effective >= BETA_WEAK_SCALE or effective <= 0.0:
            return []
        return [("beta-cfg-weak", (
            f"{self.label}: at cfg {cond_scale:g} its guidance at mid-run amounts to a CFG scale of only "
            f"{effective:.2g} on this model and latent size (below 1, so the result leans towards the unconditional "
            f"prediction, away from the prompt). β-CFG's cfg is a guidance length, not a CFG scale: to act like "
            f"CFG ≈ 5 at mid-run, use cfg ≈ {cond_scale * 5.0 / effective:.3g} (or normalization 'L2 (paper)' on "
            f"small latents)."))]
