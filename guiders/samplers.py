"""Guidance samplers: CFG++ variants of DPM-Solver++(2M/3M) SDE, and Predictor-Corrector Guidance.

Pure torch. The ComfyUI side (``nodes/samplers.py``) supplies the model as callables and the
noise-schedule conversion; everything here works on any noising ``x = α(σ)·x0 + σ·n`` described
by its half-logSNR ``λ(σ) = log(α/σ)``: ``λ = −log σ`` (α = 1) for eps/v models in ComfyUI's VE
frame, ``λ = −logit σ`` (α = 1 − σ) for flow models. ``α = σ·exp(λ)``, as ComfyUI core computes it.

**CFG++** (Chung, Kim, Park, Nam, Ye, "CFG++: Manifold-constrained Classifier Free Guidance for
Diffusion Models", ICLR 2025, arXiv 2406.08070). The clean estimate is ``D_λ = U + λ·(C − U)``
(λ ∈ [0, 1], the guider's cfg) but the sampler re-noises along the *unconditional* noise. For a
data-prediction step ``x' = A·x + B·D (+ noise)`` this is

    x' = A·(x + α·(D_λ − U)) + B·D_λ (+ the same noise),

which for Euler is exactly the paper's DDIM/Euler rule ``x' = α'·D_λ + (σ'/σ)·(x − α·U)`` and, since
A·α + B = α', equals the unguided step on U plus ``α'·(D_λ − U)``. Multistep history: the stored
predictions are the unconditional ones and the difference to the current step uses D_λ
(``D_λ − U_prev``), as ComfyUI core's ``dpmpp_2m_cfg_pp`` does; our 2M-SDE at η = 0 (midpoint) is
then that sampler exactly on eps models. With U = C (or λ = 0) every sampler here is its plain
counterpart on the same noise.

**PCG** (Bradley & Nakkiran, "Classifier-Free Guidance is a Predictor-Corrector", TMLR 2025,
arXiv 2408.09000). Each step: a conditional-only DDIM predictor to the next noise level, then K
Langevin steps there on ``p_γ ∝ p(x|c)^γ·p(x)^(1−γ)``, whose score is the CFG score at scale γ:
``∇log p_γ(x) = −(x − α·D_γ)/σ²`` with ``D_γ = U + γ·(C − U)`` (the exact score of the noised
marginal for any α; VE: −(x − D_γ)/σ²). Langevin runs in the VE-equivalent frame x̃ = x/α,
σ̃ = σ/α = exp(−λ) and is written back in x, which gives per corrector step

    x ← x − ρ·(x − α'·D_γ) + σ'·√(2ρ)·z,   ρ = δ/σ̃'²,   δ = c·min(σ̃² − σ̃'², σ̃'²).

The σ̃² − σ̃'² step (c = ½, K = 1) is the one under which DDPM with CFG at scale w equals PCG with
γ = 2w − 1 in the small-step limit. The cap at σ̃'² only binds when σ̃²/σ̃'² > 2 (coarse early steps,
and the first step of a flow schedule, where σ = 1 is infinite VE noise); it keeps the Langevin map
a contraction for c < 2. The last step (σ' = 0) is the predictor alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

GuidedDenoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(x, σ) → (D_λ, U): the guided prediction and the (possibly rewritten) unconditional one."""
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(σ, σ') → standard normal noise for the step σ → σ' (ComfyUI's noise-sampler convention)."""
StandardNormal = Callable[[torch.Tensor], torch.Tensor]
"""x → standard normal noise shaped like x (the Langevin stream)."""
HalfLogSNR = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]
StepRange = Callable[[int], Iterable[int]]

SOLVER_TYPES = ("midpoint", "heun")


class SamplerInputError(ValueError):
    """Bad sampler settings or sigmas; the message names the sampler and the fix."""


def ve_half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = −log σ: eps/v models in ComfyUI's VE frame (α = 1)."""
    return sigma.log().neg()


def flow_half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log((1 − σ)/σ): rectified-flow models (α = 1 − σ)."""
    return sigma.logit().neg()


def signal_scale(sigma: torch.Tensor, half_log_snr: HalfLogSNR) -> torch.Tensor:
    """α(σ) = σ·exp(λ(σ)): 1 for VE, 1 − σ for flow."""
    return sigma * half_log_snr(sigma).exp()


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

def check_sigmas(sigmas: torch.Tensor, label: str, half_log_snr: HalfLogSNR | None = None) -> None:
    """A 1-D, finite, strictly decreasing schedule (zero only at the end); finite λ where σ > 0 if given."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        raise SamplerInputError(f"{label}: sigmas must be a 1-D tensor (a SIGMAS input), got "
                                f"{type(sigmas).__name__} {tuple(getattr(sigmas, 'shape', ()))}")
    if sigmas.numel() < 2:
        return
    values = sigmas.detach().double().cpu()
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise SamplerInputError(f"{label}: sigmas must be finite and ≥ 0, got {values.tolist()}")
    if bool((values[1:] >= values[:-1]).any()):
        raise SamplerInputError(f"{label}: sigmas must strictly decrease (this sampler denoises); got "
                                f"{values.tolist()}. Use a scheduler node's output.")
    if half_log_snr is not None:
        positive = sigmas[sigmas > 0]
        if not bool(torch.isfinite(half_log_snr(positive)).all()):
            raise SamplerInputError(f"{label}: a sigma has infinite noise (σ = 1 on a flow model); offset the first "
                                    f"sigma slightly below 1 as ComfyUI's SDE samplers do "
                                    f"(offset_first_sigma_for_snr).")


def check_sde_settings(label: str, eta: float, s_noise: float) -> None:
    for name, value in (("eta", eta), ("s_noise", s_noise)):
        if not math.isfinite(value) or value < 0:
            raise SamplerInputError(f"{label}: {name} must be a finite number ≥ 0 (got {value}); 0 = no added noise.")


def check_pcg_settings(label: str, corrector_steps: int, step_scale: float) -> None:
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise SamplerInputError(f"{label}: corrector_steps must be a whole number ≥ 0 (got {corrector_steps}); "
                                f"0 = the conditional predictor alone.")
    if not math.isfinite(step_scale) or not 0 < step_scale <= 1:
        raise SamplerInputError(f"{label}: step_scale must be in (0, 1] (got {step_scale}); 0.5 is the step under "
                                f"which PCG with one corrector step matches DDPM with CFG.")


# ------------------------------------------------------------------------------------------------
# DPM-Solver++ SDE with CFG++
# ------------------------------------------------------------------------------------------------

class _SDEStep:
    """Coefficients of one DPM-Solver++ SDE step σ → σ' (data prediction, exponential integrator):

    x' = A·x + B·D + noise_scale·z,  A = (σ'/σ)·e^{−ηh},  B = α'·(1 − e^{−(1+η)h}),
    noise_scale = σ'·√(1 − e^{−2ηh}),  h = λ' − λ.
    """

    def __init__(self, sigma: torch.Tensor, sigma_next: torch.Tensor, half_log_snr: HalfLogSNR, eta: float):
        lam, lam_next = half_log_snr(sigma), half_log_snr(sigma_next)
        self.h = lam_next - lam
        self.h_eta = self.h * (eta + 1)
        self.alpha = sigma * lam.exp()
        self.alpha_next = sigma_next * lam_next.exp()
        self.x_scale = sigma_next / sigma * (-self.h * eta).exp()
        self.data_scale = self.alpha_next * -torch.expm1(-self.h_eta)
        self.noise_scale = sigma_next * (-torch.expm1(-2 * self.h * eta)).sqrt()
        # h·φ₂-type weight of a first difference (1 − (1 − e^{−x})/x, x = (1+η)h)
        self.phi_2 = 1 + torch.expm1(-self.h_eta) / self.h_eta

    def cfg_pp_first_order(self, x: torch.Tensor, guided: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """A·(x + α·(D_λ − U)) + B·D_λ."""
        return self.x_scale * (x + self.alpha * (guided - uncond)) + self.data_scale * guided


def _add_sde_noise(x: torch.Tensor, step: _SDEStep, noise_sampler: NoiseSampler, sigma, sigma_next,
                   eta: float, s_noise: float) -> torch.Tensor:
    if eta > 0 and s_noise > 0:
        x = x + noise_sampler(sigma, sigma_next) * (step.noise_scale * s_noise)
    return x


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_dpmpp_2m_sde_cfg_pp(denoise: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                               half_log_snr: HalfLogSNR, noise_sampler: NoiseSampler, eta: float = 1.0,
                               s_noise: float = 1.0, solver_type: str = "midpoint", callback: Callback | None = None,
                               step_range: StepRange = range) -> torch.Tensor:
    """DPM-Solver++(2M) SDE with CFG++ (see the module docstring).

    Per step: ``x' = A·(x + α·(D_λ − U)) + B·D_λ + correction + σ'·√(1 − e^{−2ηh})·s_noise·z`` with the
    second-order correction ``½·B/r·(D_λ − U_prev)`` (midpoint) or ``α'·φ₂/r·(D_λ − U_prev)`` (heun),
    r = h_prev/h. The last step (σ' = 0) returns D_λ.
    """
    label = "DPM++ 2M SDE CFG++"
    if solver_type not in SOLVER_TYPES:
        raise SamplerInputError(f"{label}: solver_type must be one of {', '.join(SOLVER_TYPES)} (got {solver_type!r})")
    check_sde_settings(label, eta, s_noise)
    check_sigmas(sigmas, label, half_log_snr)
    previous_uncond, previous_h = None, None
    for i in step_range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        guided, uncond = denoise(x, sigma)
        _report(callback, i, x, sigma, guided)
        step = None
        if sigma_next == 0:
            x = guided
        else:
            step = _SDEStep(sigma, sigma_next, half_log_snr, eta)
            x = step.cfg_pp_first_order(x, guided, uncond)
            if previous_uncond is not None:
                difference = (guided - previous_uncond) * (step.h / previous_h)
                if solver_type == "midpoint":
                    x = x + (0.5 * step.data_scale) * difference
                else:
                    x = x + (step.alpha_next * step.phi_2) * difference
            x = _add_sde_noise(x, step, noise_sampler, sigma, sigma_next, eta, s_noise)
        previous_uncond = uncond
        previous_h = step.h if step is not None else previous_h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde_cfg_pp(denoise: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                               half_log_snr: HalfLogSNR, noise_sampler: NoiseSampler, eta: float = 1.0,
                               s_noise: float = 1.0, callback: Callback | None = None,
                               step_range: StepRange = range) -> torch.Tensor:
    """DPM-Solver++(3M) SDE with CFG++ (see the module docstring).

    Per step: ``x' = A·(x + α·(D_λ − U)) + B·D_λ + α'·φ₂·d₁ − α'·φ₃·d₂ + noise`` where the divided
    differences run over the sequence (U₋₂, U₋₁, D_λ): ``d₁,₀ = (D_λ − U₋₁)/r₀``, ``d₁,₁ = (U₋₁ − U₋₂)/r₁``,
    ``d₁ = d₁,₀ + (d₁,₀ − d₁,₁)·r₀/(r₀ + r₁)``, ``d₂ = (d₁,₀ − d₁,₁)/(r₀ + r₁)``, ``φ₃ = φ₂/((1+η)h) − ½``
    (second order on the second step, first order on the first). The last step (σ' = 0) returns D_λ.
    """
    label = "DPM++ 3M SDE CFG++"
    check_sde_settings(label, eta, s_noise)
    check_sigmas(sigmas, label, half_log_snr)
    uncond_1 = uncond_2 = None  # the two previous unconditional predictions
    h_1 = h_2 = None
    for i in step_range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        guided, uncond = denoise(x, sigma)
        _report(callback, i, x, sigma, guided)
        h = None
        if sigma_next == 0:
            x = guided
        else:
            step = _SDEStep(sigma, sigma_next, half_log_snr, eta)
            h = step.h
            x = step.cfg_pp_first_order(x, guided, uncond)
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (guided - uncond_1) / r0
                d1_1 = (uncond_1 - uncond_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = step.phi_2 / step.h_eta - 0.5
                x = x + (step.alpha_next * step.phi_2) * d1 - (step.alpha_next * phi_3) * d2
            elif h_1 is not None:
                x = x + (step.alpha_next * step.phi_2) * ((guided - uncond_1) / (h_1 / h))
            x = _add_sde_noise(x, step, noise_sampler, sigma, sigma_next, eta, s_noise)
        uncond_1, uncond_2 = uncond, uncond_1
        h_1, h_2 = h, h_1
    return x


# ------------------------------------------------------------------------------------------------
# Predictor-Corrector Guidance
# ------------------------------------------------------------------------------------------------

def ddim_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              half_log_snr: HalfLogSNR) -> torch.Tensor:
    """Deterministic DDIM step σ → σ' > 0: x' = α'·D + (σ'/σ)·(x − α·D) (= Euler for VE and for flow)."""
    alpha, alpha_next = signal_scale(sigma, half_log_snr), signal_scale(sigma_next, half_log_snr)
    return alpha_next * denoised + (sigma_next / sigma) * (x - alpha * denoised)


def langevin_step_ratio(sigma: torch.Tensor, sigma_next: torch.Tensor, half_log_snr: HalfLogSNR,
                        step_scale: float) -> torch.Tensor:
    """ρ = δ/σ̃'² with δ = c·min(σ̃² − σ̃'², σ̃'²) in the VE-equivalent frame: ρ = c·min(e^{2h} − 1, 1)."""
    h = half_log_snr(sigma_next) - half_log_snr(sigma)
    return step_scale * torch.clamp(torch.expm1(2 * h), max=1.0)


def langevin_correct(x: torch.Tensor, sigma: torch.Tensor, guided_denoise: Denoiser, *, half_log_snr: HalfLogSNR,
                     ratio: torch.Tensor | float, steps: int, noise: StandardNormal,
                     noise_scale: float = 1.0) -> torch.Tensor:
    """``steps`` Langevin steps at noise level σ on the density whose denoiser is ``guided_denoise``:
    x ← x − ρ·(x − α·D(x)) + σ·s·√(2ρ)·z, i.e. x ← x + δ·∇log p + √(2δ)·z with δ = ρ·(σs)², score
    −(x − α·D)/(σs)², where s is the model's noise scale (``x = α·x0 + σ·s·n``; 1 for every model but those
    with ComfyUI's ``noise_scale``). ρ is a ratio of noise variances, so s cancels there.
    """
    alpha = signal_scale(sigma, half_log_snr)
    ratio = torch.as_tensor(ratio, dtype=sigma.dtype, device=sigma.device)
    noise_std = sigma * (2 * ratio).sqrt() * noise_scale
    for _ in range(steps):
        guided = guided_denoise(x, sigma)
        x = x - ratio * (x - alpha * guided) + noise_std * noise(x)
    return x


@torch.no_grad()
def sample_pcg(cond_denoise: Denoiser, guided_denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
               half_log_snr: HalfLogSNR, langevin_noise: StandardNormal, corrector_steps: int = 1,
               step_scale: float = 0.5, callback: Callback | None = None, step_range: StepRange = range,
               noise_scale: float = 1.0) -> torch.Tensor:
    """Predictor-Corrector Guidance (Bradley & Nakkiran, arXiv 2408.09000; see the module docstring).

    Per step σ → σ': ``x ← α'·C + (σ'/σ)·(x − α·C)`` with C the conditional prediction (one cond-only model
    call), then ``corrector_steps`` times ``x ← x − ρ·(x − α'·D_γ) + σ'·√(2ρ)·z`` with D_γ = ``guided_denoise``
    (CFG at scale γ) at σ' and ρ from :func:`langevin_step_ratio`. The last step (σ' = 0) returns C.
    ``noise_scale``: the model's noise scale s (the Langevin noise is σ'·s·√(2ρ)·z; ComfyUI's SDE samplers
    multiply their s_noise by it in the same way).
    """
    label = "PCG sampler"
    check_pcg_settings(label, corrector_steps, step_scale)
    check_sigmas(sigmas, label)
    for i in step_range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        cond = cond_denoise(x, sigma)
        _report(callback, i, x, sigma, cond)
        if sigma_next == 0:
            x = cond
            continue
        x = ddim_step(x, cond, sigma, sigma_next, half_log_snr)
        if corrector_steps:
            ratio = langevin_step_ratio(sigma, sigma_next, half_log_snr, step_scale)
            x = langevin_correct(x, sigma_next, guided_denoise, half_log_snr=half_log_snr, ratio=ratio,
                                 steps=corrector_steps, noise=langevin_noise, noise_scale=noise_scale)
    return x
