"""Norm-based corrections of the guided prediction: β-CFG's adaptive scaling and CFG rescale.

Both are nonlinear, so the space they are computed in matters; it is stated per function.
``parameterization`` is "ve" for models sampled as ``x = x0 + σ·ε`` (SD1.5, SDXL, SD2 eps and v,
EDM) and "flow" for ``x = (1 − σ)·x0 + σ·n`` (Flux, SD3, WAN, HunyuanVideo, ...).
"""

from __future__ import annotations

import torch

from .schedules import beta_pdf, beta_peak
from .tensor_ops import batch_norm, batch_std, per_sample, safe_divide, to_f32

PARAMETERIZATIONS = ("ve", "flow")


# β-CFG's normalisations of the guidance direction g = ε_c − ε_u (velocity on flow models)
BETA_NORM_RMS = "rms"  # per-element RMS, scaled to the paper's latent size: resolution-independent (default)
BETA_NORM_L2 = "l2"  # the paper's L2 norm over the whole latent
BETA_NORMS = (BETA_NORM_RMS, BETA_NORM_L2)
# the paper's latent size: SDXL at 1024² (the official latent_sdxl.py setting, cfg 7.5), 4·128·128 values
BETA_REFERENCE_ELEMENTS = 4 * 128 * 128


def beta_cfg_factor(cond: torch.Tensor, uncond: torch.Tensor, sigma: torch.Tensor | float, progress: float,
                    a: float, b: float, gamma: float, normalize_peak: bool = False,
                    normalization: str = BETA_NORM_L2,
                    reference_elements: int = BETA_REFERENCE_ELEMENTS) -> torch.Tensor:
    """β-CFG's per-sample multiplier m of the guidance weight: ``k = w·m``, ``D̂ = U + k·(C − U)``.

    Paper: Malarz, Kasymov, Zięba, Tabor, Spurek, "Classifier-free Guidance with Adaptive
    Scaling", arXiv 2502.10574; official code (gmum/beta-CFG, solver ``ddim_geo_beta``):
    ``ε̂ = ε_u + w·β(τ; a, b)·g/‖g‖^γ``, g = ε_c − ε_u, with the L2 norm per sample over all latent
    dims. Since ``g = (U − C)/σ`` (ε on eps/v models, the velocity (x − D)/σ on flow models),
    ``m = β(τ)·(σ/‖C − U‖)^γ``: ``normalization="l2"``, the paper's rule. With γ = 1 its guidance
    has a fixed L2 length ``w·β(τ)`` over the whole latent, so its strength per latent value
    scales as 1/√N with the latent size N: the same cfg is extreme on small latents and faint on
    large ones.

    ``normalization="rms"`` (the pack's resolution-independent rule) evaluates the paper's
    formula as if the latent had ``reference_elements`` values N_ref (default SDXL at 1024²):
    ``ε̂ = ε_u + w·β(τ)·g/(RMS(g)·√N_ref)^γ``, i.e. ``m_rms = m_l2·(N/N_ref)^(γ/2)``. Its
    per-element strength is the paper's at N_ref for every latent size, and the same on eps and
    flow models. Both are equal when N = N_ref.

    τ is the run's progress (ComfyUI's percent of σ; the official τ = step/(N − 1) for its own
    linear-timestep schedule). ``normalize_peak`` divides β by its maximum (the official optional
    normalisation). Returns float32 [B, 1, ...]; a zero difference gets m = 0 (no direction to follow).
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


def model_output_v(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                   parameterization: str) -> torch.Tensor:
    """The v-like quantity RescaleCFG rescales.

    "ve": the VP v-prediction ``√(σ²+1)/σ·(x/(σ²+1) − D)`` (exactly what ComfyUI core's
    RescaleCFG uses, correct for SD1.5/SD2/SDXL eps and v models); "flow": the velocity
    ``(x − D)/σ``. ``sigma`` is already broadcast to [B, 1, ...].
    """
    if parameterization == "flow":
        return (to_f32(x) - to_f32(denoised)) / sigma
    return (to_f32(x) / (sigma ** 2 + 1.0) - to_f32(denoised)) * (sigma ** 2 + 1.0).sqrt() / sigma


def denoised_from_v(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, parameterization: str) -> torch.Tensor:
    """Inverse of ``model_output_v``."""
    if parameterization == "flow":
        return to_f32(x) - sigma * v
    return to_f32(x) / (sigma ** 2 + 1.0) - v * sigma / (sigma ** 2 + 1.0).sqrt()


def rescale_to_cond_std(guided: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float,
                        parameterization: str, multiplier: float) -> torch.Tensor:
    """RescaleCFG on any guided prediction: match the std of the conditional prediction in v space.

    Paper: Lin, Liu, Li, Yang, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    WACV 2024 (arXiv 2305.08891), §3.4: ``v_re = v̂·std(v_c)/std(v̂)``,
    ``v_final = φ·v_re + (1 − φ)·v̂``, std per sample over all non-batch dims. On flow models the
    rescale is done on the velocity, the flow counterpart of the paper's v-prediction (ComfyUI core's
    RescaleCFG applied the VP formula to every model up to 0.3.x; since 2026 it rescales flow models in
    x0 space, ``x0_cfg·std(C)/std(x0_cfg)``, a different target). φ = ``multiplier``; φ = 0 returns
    ``guided`` unchanged.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")
    if multiplier == 0:
        return guided
    s = per_sample(sigma, guided)
    v_guided = model_output_v(guided, x, s, parameterization)
    v_cond = model_output_v(cond, x, s, parameterization)
    ratio = safe_divide(batch_std(v_cond), batch_std(v_guided))
    ratio = torch.where(batch_std(v_guided) > 0, ratio, torch.ones_like(ratio))
    v_final = multiplier * (v_guided * ratio) + (1.0 - multiplier) * v_guided
    return denoised_from_v(v_final, x, s, parameterization).to(guided.dtype)
