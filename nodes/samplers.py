"""SAMPLER nodes: CFG++ DPM++ 2M / 3M SDE and Predictor-Corrector Guidance (for SamplerCustomAdvanced).

The math is in ``guiders/samplers.py``; this module adapts ComfyUI's model wrapper to it:

* **CFG++** samplers read the unconditional prediction the way ComfyUI core's ``*_cfg_pp`` samplers
  do: a post-cfg function appended to a copy of the run's model_options records
  ``uncond_denoised`` (the uncond after every pre-cfg rewrite, e.g. our TCFG / CFG-Zero*), and the
  cfg=1 optimisation is disabled so U exists at λ = 1. The guided prediction is whatever the guider
  returns at its cfg (= λ), so every method of a Guidance Kit plan acts on D_λ. Noise: ComfyUI's
  Brownian-tree noise sampler, seeded like core's DPM++ SDE samplers (``noise_device`` as there).
  Flow models: ``λ(σ)`` and α come from ComfyUI's own ``sigma_to_half_log_snr`` on the model's
  ``model_sampling``, and the first sigma is offset below 1 as core does.
* **PCG**: the guider's cfg is γ. The predictor needs a conditional-only prediction from inside the
  sampler: the guider's cfg is set to 1 for that one call, with the cfg=1 optimisation active and
  the CFG-combination functions (our plan, pre-/post-cfg functions, ``sampler_cfg_function``)
  removed from a copy of the model_options, so ComfyUI evaluates the cond chunk only (1 model pass).
  The correctors call the guider unchanged (CFG at γ, plus any plan terms: 2 passes with plain CFG).
"""

from __future__ import annotations

from functools import partial

import comfy.k_diffusion.sampling as k_sampling
import comfy.model_patcher
import comfy.samplers
import torch
from comfy_api.latest import io

from ..guiders import samplers as guided_samplers
from .common import CATEGORY_ROOT, NODE_PREFIX, node_error
from .runtime.engine import PLAN_KEY

# The pack keeps all its nodes under sampling/guidance (and SAMPLER outputs are found by dragging
# from SamplerCustomAdvanced's sampler input, whatever their folder).
CATEGORY_SAMPLERS = CATEGORY_ROOT + "/samplers"

LABEL_2M = "DPM++ 2M SDE CFG++"
LABEL_3M = "DPM++ 3M SDE CFG++"
LABEL_PCG = "PCG sampler"

NOISE_DEVICES = ("gpu", "cpu")
# Langevin noise of PCG comes from its own generator, seeded from the run's seed with this offset
LANGEVIN_SEED_OFFSET = 0x5EED_C0DE


class GuidanceSamplerError(RuntimeError):
    """Raised during sampling; the message names the sampler and the fix."""


# ------------------------------------------------------------------------------------------------
# model adaptation
# ------------------------------------------------------------------------------------------------

def model_sampling_of(model):
    """``model`` is the k-diffusion wrapper ComfyUI hands a sampler function (KSamplerX0Inpaint)."""
    return model.inner_model.model_patcher.get_model_object("model_sampling")


def model_noise_scale(model_sampling) -> float:
    """The model's noise scale, as current ComfyUI's SDE samplers multiply ``s_noise`` by it (upstream 8e53f001:
    ``s_noise * getattr(model_sampling, "noise_scale", 1.0)``; set by ModelSamplingDiscreteFlow for HiDream-O1 and
    by the ModelNoiseScale node). 1 where the model_sampling has none (every model in ComfyUI 0.3.64)."""
    return float(getattr(model_sampling, "noise_scale", 1.0))


def half_log_snr_of(model_sampling):
    return partial(k_sampling.sigma_to_half_log_snr, model_sampling=model_sampling)


def progress_range(disable):
    return partial(k_sampling.trange, disable=disable)


def brownian_noise_sampler(x, sigmas, seed, noise_device: str):
    """ComfyUI's Brownian-tree noise, built as its dpmpp_2m_sde / dpmpp_2m_sde_gpu samplers build it."""
    if noise_device not in NOISE_DEVICES:
        raise node_error(f"noise_device must be one of {', '.join(NOISE_DEVICES)} (got {noise_device!r})")
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    return k_sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=noise_device == "cpu")


class UncondCapture:
    """Post-cfg function recording the unconditional prediction of the current model call."""

    def __init__(self, label: str):
        self.label = label
        self.uncond = None

    def __call__(self, args):
        if args.get("uncond") is None:
            raise GuidanceSamplerError(
                f"{self.label}: CFG++ needs the unconditional prediction, but this guider has no negative "
                f"conditioning (e.g. BasicGuider). Use CFGGuider or the Guidance Guider with a negative/empty prompt.")
        self.uncond = args["uncond_denoised"]
        return args["denoised"]


def cfg_pp_denoiser(model, extra_args: dict, label: str):
    """(x, σ) → (D_λ, U): the guider's output and the uncond it used, one model call."""
    capture = UncondCapture(label)
    options = comfy.model_patcher.set_model_options_post_cfg_function(
        dict(extra_args.get("model_options", {})), capture, disable_cfg1_optimization=True)
    call_args = {**extra_args, "model_options": options}

    def denoise(x, sigma):
        capture.uncond = None
        guided = model(x, sigma * x.new_ones([x.shape[0]]), **call_args)
        if capture.uncond is None:
            raise GuidanceSamplerError(
                f"{label}: the guider did not run ComfyUI's post-CFG functions, through which CFG++ samplers read "
                f"the unconditional prediction. Use CFGGuider or the Guidance Guider.")
        return guided, capture.uncond

    return denoise


def cond_only_model_options(model_options: dict) -> dict:
    """A copy of the run's model_options under which a cfg-1 call evaluates the cond chunk only."""
    options = dict(model_options)
    for key in (PLAN_KEY, "sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function"):
        options.pop(key, None)
    options["disable_cfg1_optimization"] = False
    return options


def check_single_scale_guider(guider, label: str) -> None:
    predict = getattr(type(guider), "predict_noise", None)
    if not isinstance(guider, comfy.samplers.CFGGuider) or predict is not comfy.samplers.CFGGuider.predict_noise:
        raise GuidanceSamplerError(
            f"{label}: it needs a guider with one cfg scale (CFGGuider, the Guidance Guider or BasicGuider) to take "
            f"conditional-only predictions; {type(guider).__name__} combines its predictions its own way.")


def cond_only_denoiser(model, extra_args: dict, label: str):
    """x, σ → C with one cond-only model pass: the guider's cfg is 1 for the call (restored after)."""
    guider = model.inner_model
    check_single_scale_guider(guider, label)
    call_args = {**extra_args, "model_options": cond_only_model_options(extra_args.get("model_options", {}))}

    def denoise(x, sigma):
        saved_cfg = guider.cfg
        guider.cfg = 1.0
        try:
            return model(x, sigma * x.new_ones([x.shape[0]]), **call_args)
        finally:
            guider.cfg = saved_cfg

    return denoise


def guided_denoiser(model, extra_args: dict):
    def denoise(x, sigma):
        return model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)

    return denoise


def langevin_noise_stream(seed):
    """Standard normal noise like x from a CPU generator of its own (same numbers on every device)."""
    generator = torch.Generator(device="cpu").manual_seed((int(seed or 0) + LANGEVIN_SEED_OFFSET) % (2 ** 63))

    def noise(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(device=like.device,
                                                                                   dtype=like.dtype)

    return noise


# ------------------------------------------------------------------------------------------------
# sampler functions (ComfyUI's KSAMPLER calling convention)
# ------------------------------------------------------------------------------------------------

def _sample_cfg_pp_sde(sample, label: str, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_device,
                       noise_sampler, **solver):
    """A CFG++ DPM++ SDE rule of ``guiders/samplers.py`` (``sample``) on ComfyUI's sampler arguments."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = brownian_noise_sampler(x, sigmas, extra_args.get("seed"), noise_device)
    model_sampling = model_sampling_of(model)
    return sample(
        cfg_pp_denoiser(model, extra_args, label), x, k_sampling.offset_first_sigma_for_snr(sigmas, model_sampling),
        half_log_snr=half_log_snr_of(model_sampling), noise_sampler=noise_sampler, eta=eta,
        s_noise=s_noise * model_noise_scale(model_sampling), callback=callback, step_range=progress_range(disable),
        **solver)


@torch.no_grad()
def sample_dpmpp_2m_sde_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                               solver_type="midpoint", noise_device="gpu", noise_sampler=None):
    return _sample_cfg_pp_sde(guided_samplers.sample_dpmpp_2m_sde_cfg_pp, LABEL_2M, model, x, sigmas, extra_args,
                              callback, disable, eta, s_noise, noise_device, noise_sampler, solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                               noise_device="gpu", noise_sampler=None):
    return _sample_cfg_pp_sde(guided_samplers.sample_dpmpp_3m_sde_cfg_pp, LABEL_3M, model, x, sigmas, extra_args,
                              callback, disable, eta, s_noise, noise_device, noise_sampler)


@torch.no_grad()
def sample_pcg(model, x, sigmas, extra_args=None, callback=None, disable=None, corrector_steps=1, step_scale=0.5):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    model_sampling = model_sampling_of(model)
    return guided_samplers.sample_pcg(
        cond_only_denoiser(model, extra_args, LABEL_PCG), guided_denoiser(model, extra_args), x, sigmas,
        half_log_snr=half_log_snr_of(model_sampling),
        langevin_noise=langevin_noise_stream(extra_args.get("seed")), corrector_steps=corrector_steps,
        step_scale=step_scale, callback=callback, step_range=progress_range(disable),
        noise_scale=model_noise_scale(model_sampling))


# ------------------------------------------------------------------------------------------------
# nodes
# ------------------------------------------------------------------------------------------------

LAMBDA_NOTE = ("The guider's cfg is CFG++'s λ in [0, 1] (about 0.5–1 for SD1.5/SDXL), not a CFG scale: "
               "cfg 7 here is far too strong.")


def _sde_inputs() -> list:
    return [
        io.Float.Input("eta", default=1.0, min=0.0, max=100.0, step=0.01,
                       tooltip="Amount of fresh noise per step (SDE stochasticity), as in ComfyUI's DPM++ SDE "
                               "samplers: 1 = the SDE, 0 = the deterministic ODE solver. " + LAMBDA_NOTE),
        io.Float.Input("s_noise", default=1.0, min=0.0, max=100.0, step=0.01,
                       tooltip="Multiplier of the added noise (1 = exact SDE; slightly above 1 adds detail)."),
        io.Combo.Input("noise_device", options=list(NOISE_DEVICES), default="gpu",
                       tooltip="Where the Brownian-tree noise is generated, as ComfyUI's dpmpp_*_sde (cpu) and "
                               "dpmpp_*_sde_gpu (gpu) samplers: 'cpu' gives the same image on every machine, "
                               "'gpu' is faster on large latents."),
    ]


def _sde_options(label: str, eta: float, s_noise: float, noise_device: str) -> dict:
    try:
        guided_samplers.check_sde_settings(label, eta, s_noise)
    except guided_samplers.SamplerInputError as e:
        raise node_error(str(e)) from None
    if noise_device not in NOISE_DEVICES:
        raise node_error(f"{label}: noise_device must be one of {', '.join(NOISE_DEVICES)} (got {noise_device!r})")
    return {"eta": float(eta), "s_noise": float(s_noise), "noise_device": noise_device}


def _sampler_output(text: str):
    return io.Sampler.Output(tooltip="Connect to SamplerCustomAdvanced's (or SamplerCustom's) sampler input. " + text)


class _CFGPPSampler:
    """What the CFG++ sampler nodes declare alike (test_conformance reads it)."""

    STATE_ACROSS_SAMPLER_CALLS = ("the multistep history and the Brownian-tree noise belong to one sampler call, as in "
                                  "ComfyUI's own DPM++ SDE samplers: a run split over two calls restarts them")
    BATCH_COUPLED = ("the SDE noise is one Brownian tree over the whole batch latent, as in ComfyUI's own SDE "
                     "samplers, so a sample's noise depends on the batch it is in")
    TYPICAL_CFG = 0.6  # the guider's cfg is CFG++'s λ in [0, 1]


class SamplerDPMPP2MSDECFGPP(_CFGPPSampler, io.ComfyNode):
    LABEL = LABEL_2M
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'CFG++ (Chung et al., ICLR 2025) for DPM-Solver++(2M) SDE, midpoint/heun, which core lacks: re-noises '
        "along the uncond, α-correct on flow models; cfg = λ ∈ [0, 1]; noise × the model's `noise_scale` (as "
        "current core); equals core's `dpmpp_2m_cfg_pp` at eta 0 on eps models",
        'all (eps/v and flow)',
        'none vs CFG',
    )
    # CFG++: λ = ω / 12.5 (the paper's correspondence λ 0.4 / 0.6 / 1.0 ~ CFG ω 5 / 7.5 / 12.5)
    COMPARE = {"key": "cfgpp_2m", "label": "DPM++ 2M SDE CFG++ (λ=cfg/12.5)", "sampler": True,
               "cfg": "{min(1, scale / 12.5)}",
               "aliases": {"cfgpp": "cfgpp_2m", "cfg++": "cfgpp_2m", "dpmpp_2m_sde_cfg_pp": "cfgpp_2m"}}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SamplerDPMPP2MSDECFGPP",
            display_name="DPM++ 2M SDE CFG++ · Sampler (cfg = λ)",
            category=CATEGORY_SAMPLERS,
            description=(
                "DPM-Solver++(2M) SDE with CFG++ (Chung et al., ICLR 2025, arXiv 2406.08070), which ComfyUI core "
                "lacks: the clean estimate is D_λ = U + λ(C − U) but each step re-noises along the unconditional "
                "prediction: x' = A·(x + α(D_λ − U)) + B·D_λ + noise for the SDE step x' = A·x + B·D + noise. "
                "Correct for eps and flow models (α = 1 − σ on flow). The guider's cfg is λ in [0, 1]. At λ = 1 "
                "it still evaluates the uncond (2 model passes per step). Works with every Guidance Kit method on "
                "the model. At eta 0 (midpoint) it equals core's dpmpp_2m_cfg_pp on SD1.5/SDXL."),
            inputs=[
                io.Combo.Input("solver_type", options=list(guided_samplers.SOLVER_TYPES), default="midpoint",
                               tooltip="Second-order correction of the 2M step, as in ComfyUI's DPM++ 2M SDE: "
                                       "'midpoint' (default) or 'heun'. " + LAMBDA_NOTE),
                *_sde_inputs(),
            ],
            outputs=[_sampler_output("Use with CFGGuider / Guidance Guider at cfg = λ ∈ [0, 1].")],
        )

    @classmethod
    def execute(cls, solver_type, eta, s_noise, noise_device):
        if solver_type not in guided_samplers.SOLVER_TYPES:
            raise node_error(f"{cls.LABEL}: solver_type must be one of {', '.join(guided_samplers.SOLVER_TYPES)}")
        options = {"solver_type": solver_type, **_sde_options(cls.LABEL, eta, s_noise, noise_device)}
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_dpmpp_2m_sde_cfg_pp, extra_options=options))


class SamplerDPMPP3MSDECFGPP(_CFGPPSampler, io.ComfyNode):
    LABEL = LABEL_3M
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "CFG++ for DPM-Solver++(3M) SDE; cfg = λ ∈ [0, 1]; noise × the model's `noise_scale`",
        'all',
        'none vs CFG',
    )
    COMPARE = {"key": "cfgpp_3m", "label": "DPM++ 3M SDE CFG++ (λ=cfg/12.5)", "sampler": True,
               "cfg": "{min(1, scale / 12.5)}", "aliases": {"dpmpp_3m_sde_cfg_pp": "cfgpp_3m"}}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SamplerDPMPP3MSDECFGPP",
            display_name="DPM++ 3M SDE CFG++ · Sampler (cfg = λ)",
            category=CATEGORY_SAMPLERS,
            description=(
                "DPM-Solver++(3M) SDE with CFG++ (Chung et al., ICLR 2025, arXiv 2406.08070), which ComfyUI core "
                "lacks: the clean estimate is D_λ = U + λ(C − U) but each step re-noises along the unconditional "
                "prediction (x' = A·(x + α(D_λ − U)) + B·D_λ + the 3M history terms + noise). Correct for eps and "
                "flow models. The guider's cfg is λ in [0, 1]; 2 model passes per step. Works with every Guidance "
                "Kit method on the model."),
            inputs=_sde_inputs(),
            outputs=[_sampler_output("Use with CFGGuider / Guidance Guider at cfg = λ ∈ [0, 1].")],
        )

    @classmethod
    def execute(cls, eta, s_noise, noise_device):
        options = _sde_options(cls.LABEL, eta, s_noise, noise_device)
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_dpmpp_3m_sde_cfg_pp, extra_options=options))


class SamplerPCG(io.ComfyNode):
    LABEL = LABEL_PCG
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Predictor-Corrector Guidance (Bradley & Nakkiran, TMLR 2025): cond-only DDIM predictor + K Langevin steps '
        'on p(x|c)^γ p(x)^(1−γ); cfg = γ (γ = 2w − 1 with K = 1 ≈ DDPM with CFG w)',
        'all',
        '1 + 2K passes per step instead of 2 (K = 1: +50%)',
    )
    # PCG: γ = 2w − 1 with K = 1, step_scale 0.5 is DDPM with CFG scale w (the paper's equivalence)
    COMPARE = {"key": "pcg", "label": "PCG (γ=2·cfg−1)", "sampler": True, "cfg": "{2 * scale - 1}"}
    STATE_ACROSS_SAMPLER_CALLS = ("the Langevin corrector's noise stream is seeded per sampler call (from the run's "
                                  "seed), so a run split over two calls draws other corrector noise")
    BATCH_COUPLED = ("the corrector's Langevin noise is drawn for the whole batch latent from one seeded "
                     "stream, so a sample's noise depends on the batch it is in")
    TYPICAL_CFG = 2.0  # the guider's cfg is PCG's γ (γ = 2w − 1 ≈ CFG at w)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SamplerPCG",
            display_name="PCG · Predictor-Corrector Guidance Sampler",
            category=CATEGORY_SAMPLERS,
            description=(
                "Predictor-Corrector Guidance (Bradley & Nakkiran, 'Classifier-Free Guidance is a Predictor-"
                "Corrector', TMLR 2025, arXiv 2408.09000). Each step: a conditional-only DDIM step to the next "
                "noise level (1 model pass), then K Langevin steps there on p(x|c)^γ·p(x)^(1−γ), whose score is "
                "the CFG score at scale γ: x ← x − ρ(x − α·D_γ) + σ√(2ρ)·z (2 passes each). The guider's cfg is γ. "
                "With K = 1 and step_scale 0.5 it matches DDPM sampling with CFG scale w when γ = 2w − 1 (paper's "
                "equivalence). A tool for studying guidance more than a fast sampler: 1 + 2K passes per step."),
            inputs=[
                io.Int.Input("corrector_steps", default=1, min=0, max=20,
                             tooltip="K: Langevin corrector steps after each predictor step (2 model passes each, "
                                     "cond + uncond at the guider's cfg = γ). 0 = the conditional DDIM sampler "
                                     "alone. Paper's DDPM equivalence: K = 1 with γ = 2w − 1 for a CFG scale w."),
                io.Float.Input("step_scale", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="c in the Langevin step δ = c·min(σ̃² − σ̃'², σ̃'²) (σ̃ = σ/α, the "
                                       "VE-equivalent noise; the cap only acts on coarse steps). 0.5 = the DDPM-"
                                       "equivalent step; smaller is gentler. Keep c·γ ≲ 1: large γ with large c "
                                       "overshoots."),
            ],
            outputs=[_sampler_output("Use with CFGGuider / Guidance Guider: their cfg is PCG's γ "
                                     "(γ = 2w − 1 mimics DDPM with CFG scale w).")],
        )

    @classmethod
    def execute(cls, corrector_steps, step_scale):
        try:
            guided_samplers.check_pcg_settings(cls.LABEL, corrector_steps, step_scale)
        except guided_samplers.SamplerInputError as e:
            raise node_error(str(e)) from None
        options = {"corrector_steps": int(corrector_steps), "step_scale": float(step_scale)}
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_pcg, extra_options=options))


NODES = [SamplerDPMPP2MSDECFGPP, SamplerDPMPP3MSDECFGPP, SamplerPCG]
