"""Model-patch nodes for the methods that change how cond and uncond predictions are combined.

Each node parses its inputs, builds its method's settings (``guiders/methods/``: one module per method,
with its formula and paper) and adds them to a clone of the MODEL's guidance plan; the plan is evaluated
by the engine with the sampler's cfg (KSampler, KSamplerAdvanced, SamplerCustom, CFGGuider, Guidance
Guider). ``COMPARE`` declares the node's row in ``compare.py`` (``comparison/methods.py`` reads it).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..guiders.methods import cfg_schedule
from ..guiders.methods.apg import APG
from ..guiders.methods.beta_cfg import BetaCFG
from ..guiders.methods.cfg_zero_star import CFGZeroStar
from ..guiders.methods.fdg import FDG
from ..guiders.methods.rescale import Rescale
from ..guiders.methods.tcfg import TCFG
from ..guiders.plan import PlanError
from ..guiders.schedules import SHAPES
from .common import (
    CATEGORY_CFG,
    NODE_PREFIX,
    SIGMA_NO_LIMIT,
    add_method,
    build_schedule,
    model_input,
    model_output,
    node_error,
    parse_float_list,
    validation_message,
)


class CFGSchedule(io.ComfyNode):
    LABEL = "CFG Schedule"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "CFG weight schedulers (Wang et al., TMLR 2024; default: the paper's `linear_increasing`) and guidance "
        'interval (Kynkäänniemi et al., NeurIPS 2024): linear/cosine/power increasing or decreasing, constant, '
        "step list; progress and sigma windows, progress = ComfyUI's percent of σ (split runs get one schedule)",
        'all',
        'none; **saves** the uncond call outside the window',
    )
    COMPARE = {"key": "cfg_schedule", "exact": True, "aliases": {"schedule": "cfg_schedule"}}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "CFGSchedule",
            display_name="CFG Schedule · Weight Schedulers & Guidance Interval",
            category=CATEGORY_CFG,
            description=(
                "Varies the CFG scale over the sampling run (Wang et al., 'Analysis of Classifier-Free Guidance "
                "Weight Schedulers', TMLR 2024) and/or limits guidance to a sigma interval (Kynkäänniemi et al., "
                "NeurIPS 2024). The sampler's cfg w becomes w_t = 1 + (w − 1)·f(progress): increasing shapes give "
                "little guidance at high noise and more at the end; every shape has mean 1 over the run, so compare "
                "it with plain CFG at the same cfg. Outside the window the step is conditional-only and the "
                "unconditional model call is skipped (fewer model calls)."),
            inputs=[
                model_input(),
                io.Combo.Input("schedule", options=list(SHAPES), default="linear_increasing",
                               tooltip="Shape of the guidance strength over the run's progress (ComfyUI's percent "
                                       "of sigma, so a run split over several samplers gets the same schedule). "
                                       "'linear_increasing' (default) and 'cosine_increasing' are the paper's "
                                       "recommended schedules; 'constant' with a sigma window is the guidance "
                                       "interval; 'step_list' takes your own values."),
                io.Float.Input("power", default=2.0, min=0.1, max=10.0, step=0.1,
                               tooltip="Exponent k of the power schedules ((k + 1)·u^k, mean 1 over the run). "
                                       "Ignored by other shapes."),
                io.String.Input("step_values", default="1, 1, 0.5, 0", multiline=False,
                                tooltip="For 'step_list': multipliers of the guidance strength (1 = the sampler's "
                                        "cfg, 0 = no guidance), spread evenly over the run's progress 0 → 1 and "
                                        "interpolated between. Ignored by other shapes."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Guidance acts from this progress (ComfyUI's percent of sigma, 0 = pure "
                                       "noise, as core nodes' start_percent)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Guidance acts until this progress (ComfyUI's percent of sigma, 1 = sigma 0)."),
                io.Float.Input("sigma_high", default=SIGMA_NO_LIMIT, min=0.0, max=SIGMA_NO_LIMIT, step=0.01,
                               tooltip="Guidance interval: guide only while sigma ≤ this value. 1000 = no limit. "
                                       "SDXL/SD1.5 (eps) sigmas run from ~14.6 down; flow models (Flux, SD3, WAN) "
                                       "from 1.0. Paper value for SDXL: 5.42."),
                io.Float.Input("sigma_low", default=0.0, min=0.0, max=SIGMA_NO_LIMIT, step=0.01,
                               tooltip="Guidance interval: guide only while sigma > this value. 0 = no limit. "
                                       "Paper value for SDXL: 0.28."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def validate_inputs(cls, schedule="linear_increasing", power=2.0, step_values="", start_percent=0.0,
                        end_percent=1.0, sigma_high=SIGMA_NO_LIMIT, sigma_low=0.0, **kwargs):
        return validation_message(build_schedule, cls.LABEL, schedule, power, step_values, start_percent,
                                  end_percent, sigma_high, sigma_low)

    @classmethod
    def execute(cls, model, schedule, power, step_values, start_percent, end_percent, sigma_high, sigma_low):
        built = build_schedule(cls.LABEL, schedule, power, step_values, start_percent, end_percent, sigma_high,
                               sigma_low)
        return io.NodeOutput(add_method(model, cfg_schedule.CFGSchedule(built, cls.LABEL)))


BETA_NORMALIZATIONS = {"per-element RMS (resolution-independent)": "rms", "L2 (paper)": "l2"}


class BetaCFGNode(io.ComfyNode):
    LABEL = "β-CFG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Classifier-free Guidance with Adaptive Scaling (Malarz et al., arXiv 2502.10574): a guidance of fixed '
        'length shaped by a beta curve over the run; default per-element RMS normalisation (the same cfg at every '
        "resolution and on eps and flow models, the paper's strength per latent value at SDXL 1024²), the paper's "
        'L2 as an option; its cfg is a guidance length, not a CFG scale (it says which cfg to use when it acts '
        'below CFG 1)',
        'all',
        'none',
    )
    # β-CFG's cfg is the length of its guidance, not a CFG scale: on the embedded model (class guidance per pixel
    # ~10× SDXL's) its default (per-element RMS) is near unconditional at CFG's values and needs ~16× them for the
    # same strength (β-CFG 48 ≈ CFG 3, benchmarks/beta_cfg_strength.py): both rows in the metrics report.
    COMPARE = {"key": "beta_cfg", "exact": True, "aliases": {"beta": "beta_cfg"},
               "report": ("beta_cfg", "beta_cfg:cfg={16 * scale}")}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "BetaCFG",
            display_name="β-CFG · Classifier-free Guidance with Adaptive Scaling",
            category=CATEGORY_CFG,
            description=(
                "β-CFG (Malarz et al., arXiv 2502.10574): gradient-normalised guidance shaped by a beta-density "
                "time curve: ε̂ = ε_u + cfg·β(τ; a, b)·g/‖g‖^γ with g = ε_c − ε_u (the velocity on flow models) and "
                "τ the run's progress. With γ = 1 the guidance has a fixed length, so the sampler's cfg is not a CFG "
                "scale: it sets that length. Default normalisation: per-element RMS, the paper's formula evaluated "
                "at the paper's SDXL latent size (4×128×128), so the same cfg gives the same strength at every "
                "resolution and on eps and flow models (the paper's L2 norm over the whole latent makes cfg "
                "stronger on small latents and weaker on large ones). Recommended cfg: 5–10 (SDXL; the paper's "
                "7.5), 10–15 on SD1.5 (15 = the paper's SD1.5 example at 512²); models with a strong class signal "
                "per pixel need far more (the embedded digits model: 30–50). For a, b > 1 the first and last steps "
                "are unconditional (as in the paper)."),
            inputs=[
                model_input(),
                io.Float.Input("a", default=2.0, min=1.0, max=10.0, step=0.1,
                               tooltip="Beta-curve parameter a (≥ 1). Larger a moves the guidance peak later. "
                                       "Official default 2."),
                io.Float.Input("b", default=2.0, min=1.0, max=10.0, step=0.1,
                               tooltip="Beta-curve parameter b (≥ 1). Larger b moves the guidance peak earlier. "
                                       "Official default 2 (README example 3)."),
                io.Float.Input("gamma", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Exponent of the norm in the gradient normalisation. 1 = fixed-length "
                                       "guidance (paper), 0 = no normalisation (a time-curved CFG)."),
                io.Boolean.Input("normalize_peak", default=False,
                                 tooltip="Divide the beta curve by its peak so it tops out at 1 (official optional "
                                         "normalisation; needs a, b > 1 or equal to 1)."),
                io.Combo.Input("normalization", options=list(BETA_NORMALIZATIONS), optional=True,
                               default=next(iter(BETA_NORMALIZATIONS)),
                               tooltip="How ‖g‖ is measured. 'per-element RMS (resolution-independent)' (default): "
                                       "RMS(g)·√65536, the paper's L2 norm as if the latent had SDXL-1024²'s 65,536 "
                                       "values: one cfg means the same strength at every resolution (identical to "
                                       "the paper on SDXL at 1024²). 'L2 (paper)': the official code's norm over the "
                                       "whole latent; the same cfg is then twice as strong per value at half the "
                                       "width and height."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def _build(cls, a, b, gamma, normalize_peak, normalization) -> BetaCFG:
        if normalization not in BETA_NORMALIZATIONS:
            raise node_error(f"{cls.LABEL}: normalization must be one of {', '.join(BETA_NORMALIZATIONS)}; "
                             f"got {normalization!r}")
        return BetaCFG(a, b, gamma, normalize_peak, cls.LABEL, normalization=BETA_NORMALIZATIONS[normalization])

    @classmethod
    def validate_inputs(cls, normalization=next(iter(BETA_NORMALIZATIONS)), **kwargs):
        if normalization not in BETA_NORMALIZATIONS:
            return f"{cls.LABEL}: normalization must be one of {', '.join(BETA_NORMALIZATIONS)}; got {normalization!r}"
        return True

    @classmethod
    def execute(cls, model, a, b, gamma, normalize_peak, normalization=next(iter(BETA_NORMALIZATIONS))):
        return io.NodeOutput(add_method(model, cls._build(a, b, gamma, normalize_peak, normalization)))


APG_FDG_MODES = {"projection only (diffusers FDG)": "projection",
                 "momentum, clip and projection per band (pack extension)": "full"}


class APGNode(io.ComfyNode):
    LABEL = "APG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "Adaptive Projected Guidance (Sadat et al., ICLR 2025) — paper-exact (core's node is off by one); with "
        "FDG: its projection per band (as diffusers' FDG; momentum and clip per band as an option)",
        'all, image and video latents',
        'none',
    )
    COMPARE = {"key": "apg", "exact": True}
    STATE_ACROSS_SAMPLER_CALLS = ("its momentum buffer belongs to one sampler call: a run split over two samplers "
                                  "(KSamplerAdvanced 0–k, k–N) starts the momentum again in the second (momentum 0 "
                                  "or APG on FDG bands: a split run equals one call)")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "APG",
            display_name="APG · Adaptive Projected Guidance",
            category=CATEGORY_CFG,
            description=(
                "APG (Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416), paper-exact on the denoised "
                "prediction: Δ = C − U with momentum and a norm clip, split into the part parallel to C (which "
                "causes oversaturation) and the orthogonal part; D = C + (cfg − 1)·(Δ⊥ + η·Δ∥). At η = 1, "
                "threshold 0, momentum 0 it equals plain CFG at the same cfg (ComfyUI core's APG node equals CFG "
                "at cfg + 1 there). Use it at high cfg (e.g. 10–15) for saturated, artifact-free images. The "
                "momentum restarts with every sampler call (a run split over two KSamplerAdvanced nodes starts it "
                "twice). With FDG in the chain, by default only the projection (η) acts per frequency band, as "
                "diffusers' FDG parallel weights (see fdg_bands)."),
            inputs=[
                model_input(),
                io.Float.Input("eta", default=0.0, min=-1.0, max=2.0, step=0.01,
                               tooltip="Weight η of the guidance component parallel to the conditional prediction. "
                                       "0 (paper recommendation) removes it; 1 keeps it (plain CFG direction)."),
                io.Float.Input("norm_threshold", default=15.0, min=0.0, max=200.0, step=0.5,
                               tooltip="Clip the guidance vector's L2 norm (per sample, over the whole latent) to "
                                       "this value; 0 disables. Model-dependent: sweep it (≈5–15 for SD1.5/SDXL "
                                       "latents; larger latents and 16-channel flow latents need more). Not used per "
                                       "FDG band unless fdg_bands says so."),
                io.Float.Input("momentum", default=-0.5, min=-0.99, max=0.99, step=0.01,
                               tooltip="Momentum β of the running guidance average Δ̄ = Δ + β·Δ̄_prev. The paper "
                                       "uses negative values (−0.5, sometimes −0.75); 0 disables. Restarts with every "
                                       "sampler call. Not used per FDG band unless fdg_bands says so."),
                io.Combo.Input("fdg_bands", options=list(APG_FDG_MODES), default=next(iter(APG_FDG_MODES)),
                               optional=True,
                               tooltip="Only with FDG in the chain: what APG does on each frequency band. 'projection "
                                       "only' (default): Δ⊥ + η·Δ∥ per band, as diffusers' FrequencyDecoupledGuidance "
                                       "parallel_weights; momentum and norm_threshold are not applied (neither the "
                                       "FDG nor the APG paper applies them per band). 'momentum + clip + projection "
                                       "per band': the whole APG rule on every band, each with its own momentum and "
                                       "the absolute clip (the pack's earlier behaviour)."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def validate_inputs(cls, fdg_bands=next(iter(APG_FDG_MODES)), **kwargs):
        if fdg_bands not in APG_FDG_MODES:
            return f"{cls.LABEL}: fdg_bands must be one of {', '.join(APG_FDG_MODES)}; got {fdg_bands!r}"
        return True

    @classmethod
    def execute(cls, model, eta, norm_threshold, momentum, fdg_bands=next(iter(APG_FDG_MODES))):
        if fdg_bands not in APG_FDG_MODES:
            raise node_error(f"{cls.LABEL}: fdg_bands must be one of {', '.join(APG_FDG_MODES)}; got {fdg_bands!r}")
        return io.NodeOutput(add_method(model, APG(eta, norm_threshold, momentum, cls.LABEL, APG_FDG_MODES[fdg_bands])))


class TCFGNode(io.ComfyNode):
    LABEL = "TCFG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Tangential Damping CFG (Kwon et al., CVPR 2025) — exact, without an SVD of the latent',
        'all',
        'none',
    )
    COMPARE = {"key": "tcfg", "exact": True}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "TCFG",
            display_name="TCFG · Tangential Damping CFG",
            category=CATEGORY_CFG,
            description=(
                "TCFG (Kwon et al., CVPR 2025, arXiv 2503.18137): removes the tangential component of the "
                "unconditional score, keeping only its projection on the dominant direction of span{ε_u, ε_c} "
                "(computed per sample, exactly, without an SVD of the latent). Then ordinary CFG. No parameters; "
                "the sampler's cfg is the scale. Stacks with APG, FDG, β-CFG and schedules (it rewrites the uncond "
                "first)."),
            inputs=[model_input()],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model):
        return io.NodeOutput(add_method(model, TCFG(cls.LABEL)))


class CFGZeroStarNode(io.ComfyNode):
    LABEL = "CFG-Zero*"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Optimized scale + zero-init (Fan et al., arXiv 2503.18886) — paper-exact x0 rule (core drops a term and '
        "has no zero-init); zero-init automatic: the first step on flow models only (the paper's code is "
        'flow-only; on eps models it leaves noise blobs), and only in a sampler call that starts from pure noise',
        'all (paper: flow models)',
        'none; zero-init steps **skip** the model call',
    )
    COMPARE = {"key": "cfg_zero_star", "exact": True,
               "aliases": {"cfgzero": "cfg_zero_star", "cfg_zero": "cfg_zero_star", "cfg-zero*": "cfg_zero_star"}}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "CFGZeroStar",
            display_name="CFG-Zero* · Optimized Scale and Zero-Init",
            category=CATEGORY_CFG,
            description=(
                "CFG-Zero* (Fan et al., arXiv 2503.18886), paper-exact for flow (velocity) and eps models: the "
                "unconditional velocity is scaled by α* = ⟨v_c, v_u⟩/‖v_u‖² per sample, then CFG; in x0 space "
                "D = cfg·C + α*(1 − cfg)·U + (1 − α*)(1 − cfg)·x (ComfyUI core's CFGZeroStar drops the x term). "
                "Zero-init leaves the latent unchanged on the first steps and skips their model calls; by default "
                "only on flow models, as the paper's code (on eps/v models it leaves noise blobs). For "
                "guidance-distilled models (Flux dev) use zero-init only."),
            inputs=[
                model_input(),
                io.Boolean.Input("optimized_scale", default=True,
                                 tooltip="Scale the unconditional prediction by the optimal α* (the 'CFG-Zero*' part). "
                                         "Acts only when cfg ≠ 1."),
                io.Int.Input("zero_init_steps", default=-1, min=-1, max=100,
                             tooltip="Number of first steps whose output is zeroed (the latent is left unchanged and "
                                     "no model call is made), in a sampler call that starts from pure noise (never a "
                                     "second pass, refiner or img2img). −1 = automatic: the first step on flow models "
                                     "(Flux, SD3, WAN, ...), off on eps/v models (SD1.5, SDXL), where the paper never "
                                     "uses it and it leaves dark blobs. 0 = off, 1 = first step (official "
                                     "zero_steps=0), 2 = first two (official Wan T2V setting)."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, optimized_scale, zero_init_steps):
        steps = None if zero_init_steps < 0 else zero_init_steps  # −1: automatic, resolved for the sampled model
        return io.NodeOutput(add_method(model, CFGZeroStar(optimized_scale, steps, cls.LABEL)))


FDG_SCALE_MODES = {"absolute (replace cfg)": False, "relative to cfg": True}


class FDGNode(io.ComfyNode):
    LABEL = "FDG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Frequency-Decoupled Guidance (Sadat et al., arXiv 2506.19713): per-band scales on a Laplacian pyramid; '
        'the scales replace cfg (paper; a warning when cfg would not act) or are relative to cfg (`scale_mode`)',
        'all, 4-D and 5-D latents',
        'none',
    )
    COMPARE = {"key": "fdg", "exact": True, "overrides": {"scales": "{scale}, {1 + (scale - 1) / 2}"}}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "FDG",
            display_name="FDG · Frequency-Decoupled Guidance",
            category=CATEGORY_CFG,
            description=(
                "FDG (Sadat et al., arXiv 2506.19713): splits C and U into a Laplacian pyramid (kornia) and applies "
                "a separate CFG scale per frequency band, high → low: strong guidance on high frequencies for detail, "
                "weak on low frequencies to keep colours and diversity. By default (as the paper and diffusers) the "
                "scales ARE the band weights and the sampler's cfg has no effect on FDG: the same image at cfg 3 and "
                "7 (a log line says so when cfg differs from the first scale). With scale_mode 'relative to cfg' the "
                "sampler's cfg sets the strength: band weight = 1 + (cfg − 1)·scale. A schedule scales each band's "
                "increment. Works on image (4-D) and video (5-D, per frame) latents. With APG in the chain, APG's "
                "projection (η) acts per band (diffusers' parallel weights)."),
            inputs=[
                model_input(),
                io.String.Input("scales", default="10, 5",
                                tooltip="One value per pyramid level, from the highest frequency to the lowest (the "
                                        "count sets the number of levels, 2–6). Absolute mode: the CFG scale of each "
                                        "band (paper/diffusers SDXL: '10, 5'; equal values = plain CFG at that "
                                        "value). Relative mode: each band's share of the sampler's cfg ('1, 0.5' at "
                                        "cfg 10 gives 10 and 5.5; '1, 1' = plain CFG at cfg)."),
                io.Combo.Input("scale_mode", options=list(FDG_SCALE_MODES), default=next(iter(FDG_SCALE_MODES)),
                               optional=True,
                               tooltip="'absolute (replace cfg)' (paper, diffusers): the scales are the band weights; "
                                       "the sampler's cfg does NOT change FDG's guidance (keep it at the first scale "
                                       "so that bypassing FDG gives the matching plain CFG). 'relative to cfg': "
                                       "band weight = 1 + (cfg − 1)·scale, so cfg acts as usual (cfg 1 = no "
                                       "guidance)."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def _build(cls, scales: str, scale_mode: str = next(iter(FDG_SCALE_MODES))) -> FDG:
        if scale_mode not in FDG_SCALE_MODES:
            raise node_error(f"{cls.LABEL}: scale_mode must be one of {', '.join(FDG_SCALE_MODES)}; got {scale_mode!r}")
        fdg = FDG(parse_float_list(scales, cls.LABEL, "scales"), cls.LABEL, relative=FDG_SCALE_MODES[scale_mode])
        try:
            fdg.validate()
        except PlanError as e:
            raise node_error(str(e)) from None
        return fdg

    @classmethod
    def validate_inputs(cls, scales="10, 5", scale_mode=next(iter(FDG_SCALE_MODES)), **kwargs):
        return validation_message(cls._build, scales, scale_mode)

    @classmethod
    def execute(cls, model, scales, scale_mode=next(iter(FDG_SCALE_MODES))):
        return io.NodeOutput(add_method(model, cls._build(scales, scale_mode)))


class RescaleNode(io.ComfyNode):
    LABEL = "Rescale"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'RescaleCFG (Lin et al., WACV 2024) on the whole plan, in velocity space on flow models (core 0.3.x used '
        'the VP formula there; current core rescales flow models in x0 space, a different target)',
        'all',
        'none',
    )
    COMPARE = {"key": "rescale", "exact": True}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "Rescale",
            display_name="Rescale Guidance · std match (RescaleCFG, flow-aware)",
            category=CATEGORY_CFG,
            description=(
                "RescaleCFG (Lin et al., WACV 2024, arXiv 2305.08891 §3.4) applied to the whole guided prediction of "
                "the plan (CFG and every stacked method): its standard deviation in v space is matched to the "
                "conditional prediction's, then blended by 'multiplier'. Uses the VP v-prediction on SD1.5/SD2/SDXL "
                "and the velocity on flow models (Flux, SD3, WAN; ComfyUI core applied the VP formula there up to "
                "0.3.x and rescales in x0 space since 2026, a different target). Keeps high-scale stacks from "
                "overexposing."),
            inputs=[
                model_input(),
                io.Float.Input("multiplier", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="Blend φ between the rescaled and the unrescaled prediction. 0.7 is the "
                                       "paper's value; 0 = off."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, multiplier):
        return io.NodeOutput(add_method(model, Rescale(multiplier, cls.LABEL)))


NODES = [CFGSchedule, BetaCFGNode, APGNode, TCFGNode, CFGZeroStarNode, FDGNode, RescaleNode]
