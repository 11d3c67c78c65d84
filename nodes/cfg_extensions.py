"""Model-patch nodes for the CFG-space methods users know from other packs (issue 18, part A): dynamic
thresholding, Skimmed CFG, power-law CFG, ADG, Momentum Guidance and SMC-CFG. Each is one method of the plan
(``guiders/methods/``), so they stack with every other Guidance Kit node in any order.
"""

from __future__ import annotations

import math

from comfy_api.latest import io

from ..guiders.methods.adg import ADG, ADG_OFFICIAL_ANGLE
from ..guiders.methods.dynamic_thresholding import DynamicThresholding
from ..guiders.methods.momentum_guidance import MomentumGuidance
from ..guiders.methods.power_law_cfg import PowerLawCFG
from ..guiders.methods.skimmed_cfg import SkimmedCFG
from ..guiders.methods.smc_cfg import SMCCFG
from .common import CATEGORY_CFG, NODE_PREFIX, add_method, model_input, model_output, node_error

DYNAMIC_THRESHOLDING_MODES = {"mimic (sd-dynamic-thresholding)": "mimic", "imagen (percentile clamp)": "imagen"}


class DynamicThresholdingNode(io.ComfyNode):
    LABEL = "Dynamic Thresholding"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Dynamic thresholding (Saharia et al., NeurIPS 2022, Imagen) and its "mimic" variant '
        '(mcmonkeyprojects/sd-dynamic-thresholding, default mode, per sample and channel: batches of any size)',
        'all, image and video latents',
        'none',
    )
    COMPARE = {"key": "dynamic_thresholding", "exact": True, "aliases": {"dynthres": "dynamic_thresholding"},
               "overrides": {"mimic_scale": "{min(scale, 2.0)}"}}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "DynamicThresholding",
            display_name="Dynamic Thresholding · CFG Mimic / Imagen Percentile Clamp",
            category=CATEGORY_CFG,
            description=(
                "High cfg without burnt colours. 'mimic' (sd-dynamic-thresholding's default mode): the guided "
                "prediction at your cfg is clamped at a percentile of its own values and rescaled, per sample and "
                "channel, to the value range the same guidance has at mimic_scale, so cfg 20 keeps cfg 7's colours "
                "and contrast with more adherence. 'imagen' (Saharia et al. 2022): the denoised prediction is "
                "clamped per sample at max(percentile of |x0|, imagen_range) and scaled back into ±imagen_range. "
                "Acts on the whole plan's result (before Rescale), so it stacks with every other node."),
            inputs=[
                model_input(),
                io.Combo.Input("mode", options=list(DYNAMIC_THRESHOLDING_MODES),
                               default=next(iter(DYNAMIC_THRESHOLDING_MODES)),
                               tooltip="'mimic' (default, the reference ComfyUI node's): keep the value range of "
                                       "the guidance at mimic_scale. 'imagen': Imagen's percentile clamp of x0 into "
                                       "±imagen_range (meant for pixel-like ranges; latents need a larger range)."),
                io.Float.Input("mimic_scale", default=7.0, min=1.0, max=100.0, step=0.5,
                               tooltip="'mimic' mode: the cfg whose value range the result keeps (reference default "
                                       "7). Set the sampler's cfg higher (e.g. 15–30); at a cfg not above "
                                       "mimic_scale the node has (almost) no effect."),
                io.Float.Input("threshold_percentile", default=1.0, min=0.5, max=1.0, step=0.001,
                               tooltip="The percentile of |values| that is clamped: 1 = the maximum (reference "
                                       "default, a pure rescale); 0.99–0.995 also clips the outliers (Imagen "
                                       "uses 0.995)."),
                io.Boolean.Input("per_channel", default=True,
                                 tooltip="'mimic' mode: measure ranges per latent channel (the reference node's "
                                         "separate_feature_channels, default on) or over the whole sample."),
                io.Float.Input("interpolate_phi", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="'mimic' mode: blend of the thresholded (1) and the plain guided (0) "
                                       "prediction (reference default 1)."),
                io.Float.Input("imagen_range", default=1.0, min=0.01, max=100.0, step=0.01,
                               tooltip="'imagen' mode: the data range r (x0 is clamped to max(percentile, r) and "
                                       "scaled into ±r). 1 = Imagen's pixel range; SD latents span about ±4."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def validate_inputs(cls, mode=next(iter(DYNAMIC_THRESHOLDING_MODES)), **kwargs):
        if mode not in DYNAMIC_THRESHOLDING_MODES:
            return f"{cls.LABEL}: mode must be one of {', '.join(DYNAMIC_THRESHOLDING_MODES)}; got {mode!r}"
        return True

    @classmethod
    def execute(cls, model, mode, mimic_scale, threshold_percentile, per_channel, interpolate_phi, imagen_range):
        if mode not in DYNAMIC_THRESHOLDING_MODES:
            raise node_error(f"{cls.LABEL}: mode must be one of {', '.join(DYNAMIC_THRESHOLDING_MODES)}; "
                             f"got {mode!r}")
        method = DynamicThresholding(DYNAMIC_THRESHOLDING_MODES[mode], mimic_scale, threshold_percentile,
                                     per_channel, interpolate_phi, imagen_range, cls.LABEL)
        return io.NodeOutput(add_method(model, method))


class SkimmedCFGNode(io.ComfyNode):
    LABEL = "Skimmed CFG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Skimmed CFG (Extraltodeus/Skimmed_CFG): CFG at a lower scale only where the guided prediction overshoots '
        'both predictions; exact to the reference, the conditional prediction left untouched, no state',
        'all',
        'none',
    )
    COMPARE = {"key": "skimmed_cfg", "exact": True, "aliases": {"skimmed": "skimmed_cfg"},
               "overrides": {"skimming_cfg": "{min(scale, 2.0)}"}}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SkimmedCFG",
            display_name="Skimmed CFG · Damp Where CFG Overshoots",
            category=CATEGORY_CFG,
            description=(
                "Skimmed CFG (Extraltodeus/Skimmed_CFG, its 'Skimmed CFG' node): wherever CFG pushes a value past "
                "both the conditional and the unconditional prediction (away from zero), that value gets CFG at "
                "skimming_cfg instead of the sampler's cfg; first the same on the unconditional prediction. "
                "Everything else keeps the full cfg, so a high cfg keeps its adherence without burning. Exact to "
                "the reference formula, but the conditional prediction other nodes see stays unchanged and nothing "
                "is kept between runs. It only damps: at a cfg not above skimming_cfg it does nothing."),
            inputs=[
                model_input(),
                io.Float.Input("skimming_cfg", default=7.0, min=0.0, max=30.0, step=0.5,
                               tooltip="The cfg given to the overshooting values (reference default 7). Lower = "
                                       "stronger damping; use a sampler cfg well above it (e.g. 12–20)."),
                io.Boolean.Input("full_skim_negative", default=False,
                                 tooltip="Skim the unconditional prediction's overshooting values fully (scale 0) "
                                         "instead of at skimming_cfg (reference option, default off)."),
                io.Boolean.Input("flipping_filter", default=True,
                                 tooltip="Also require that the step moves the value further from zero than the "
                                         "current latent (the reference's filter; its 'disable_flipping_filter' off)."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, skimming_cfg, full_skim_negative, flipping_filter):
        return io.NodeOutput(add_method(model, SkimmedCFG(skimming_cfg, full_skim_negative, flipping_filter,
                                                          cls.LABEL)))


class PowerLawCFGNode(io.ComfyNode):
    LABEL = "Power-law CFG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Power-law CFG (Lehman Pavasovic et al., arXiv 2502.07849): the weight scales as ‖Δs‖^α per sample '
        '(units and clamp of the ComfyUI port; no official code)',
        'all',
        'none (the uncond is also evaluated at cfg 1)',
    )
    COMPARE = {"key": "power_law_cfg", "exact": True, "aliases": {"power_law": "power_law_cfg"}}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "PowerLawCFG",
            display_name="Power-law CFG · Non-linear CFG Weight",
            category=CATEGORY_CFG,
            description=(
                "Power-law CFG (Lehman Pavasovic, Verbeek, Biroli, Mézard, arXiv 2502.07849): the CFG weight "
                "becomes ω = cfg·‖Δs‖^α per sample, with Δs the difference of the conditional and unconditional "
                "scores (C − U)/(σ² + 1), times (1 − σ) on flow models, as the ComfyUI port; ω is never below 1. "
                "α > 0 guides harder where the prompt changes the prediction a lot (early steps) and less where it "
                "does not; α < 0 the reverse. The norm is over the whole latent, so the effective scale depends on "
                "the latent size: compare with plain CFG and lower cfg when it is too strong."),
            inputs=[
                model_input(),
                io.Float.Input("alpha", default=0.9, min=-0.99, max=10.0, step=0.01,
                               tooltip="The exponent α (0 = plain CFG). 0.9 is the ComfyUI port's default (no "
                                       "official value); sweep 0.2–1 with a lower cfg than usual."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, alpha):
        return io.NodeOutput(add_method(model, PowerLawCFG(alpha, cls.LABEL)))


class ADGNode(io.ComfyNode):
    LABEL = "ADG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Angle Domain Guidance (Jin et al., ICML 2025): rotates the conditional prediction away from the '
        'unconditional one by an angle ∝ cfg − 1 instead of extrapolating (official ADG_SD3 rule)',
        'all (paper: SD3/3.5)',
        'none',
    )
    COMPARE = {"key": "adg", "exact": True}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "ADG",
            display_name="ADG · Angle Domain Guidance",
            category=CATEGORY_CFG,
            description=(
                "ADG (Jin, Xiao, Liu, Gu, ICML 2025, arXiv 2506.11039; official code jinc7461/ADG): instead of "
                "extrapolating U + cfg·(C − U), which inflates the latent's norm (saturated, burnt colours at high "
                "cfg), the conditional prediction is rotated away from the unconditional one by (cfg − 1)× their "
                "angle, capped at max_angle. The norm stays within √2 of the conditional prediction's, so high cfg "
                "keeps natural colours. The sampler's cfg sets the rotation."),
            inputs=[
                model_input(),
                io.Float.Input("max_angle", default=ADG_OFFICIAL_ANGLE, min=0.01, max=round(math.pi / 2, 4),
                               step=0.01,
                               tooltip="The largest rotation in radians (official π/3 ≈ 1.047). Smaller = gentler "
                                       "guidance at high cfg."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, max_angle):
        return io.NodeOutput(add_method(model, ADG(max_angle, cls.LABEL)))


class MomentumGuidanceNode(io.ComfyNode):
    LABEL = "Momentum Guidance"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Momentum Guidance (Liao et al., arXiv 2602.20360): the guided velocity extrapolated away from its '
        'running average; acts without CFG too',
        'all (paper: flow models)',
        'none',
    )
    COMPARE = {"key": "momentum_guidance", "aliases": {"momentum": "momentum_guidance"}}
    STATE_ACROSS_SAMPLER_CALLS = ("its running average of the velocity belongs to one sampler call: a run split "
                                  "over two samplers (KSamplerAdvanced 0–k, k–N) starts the average again in the "
                                  "second")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "MomentumGuidance",
            display_name="Momentum Guidance · Velocity Extrapolation",
            category=CATEGORY_CFG,
            description=(
                "Momentum Guidance (Liao et al., arXiv 2602.20360): sharper, more detailed samples without an extra "
                "model call. The velocity the sampler uses is pushed away from the running average of the previous "
                "steps' velocities: v̂ = v + α·(v − m), m ← (1 − β)·v + β·m. Works at cfg 1 (a guidance of its own) "
                "and on top of CFG and every other node. The average restarts with every sampler call."),
            inputs=[
                model_input(),
                io.Float.Input("alpha", default=0.5, min=0.0, max=5.0, step=0.05,
                               tooltip="Extrapolation weight α (0 = off). The pack's default 0.5 (the paper's values "
                                       "could not be read); raise for more detail, lower if it overshoots."),
                io.Float.Input("beta", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="EMA decay β of the running average (0 = the previous step only). The "
                                       "pack's default 0.5."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, alpha, beta):
        return io.NodeOutput(add_method(model, MomentumGuidance(alpha, beta, cls.LABEL)))


class SMCCFGNode(io.ComfyNode):
    LABEL = "SMC-CFG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'SMC-CFG / CFG-Ctrl (Wang et al., CVPR 2026, arXiv 2603.03281): sliding-mode control of the guidance '
        'error (official common_cfg_ctrl rule)',
        'all (paper: SD3.5, Flux, Qwen-Image, WAN)',
        'none',
    )
    COMPARE = {"key": "smc_cfg", "exact": True, "aliases": {"cfg_ctrl": "smc_cfg"}}
    STATE_ACROSS_SAMPLER_CALLS = ("its previous guidance error belongs to one sampler call: a run split over two "
                                  "samplers (KSamplerAdvanced 0–k, k–N) starts the sliding surface again in the "
                                  "second")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SMCCFG",
            display_name="SMC-CFG · Sliding-Mode Control CFG (CFG-Ctrl)",
            category=CATEGORY_CFG,
            description=(
                "SMC-CFG (Wang et al., 'CFG-Ctrl', CVPR 2026, arXiv 2603.03281; official code hanyang-21/CFG-Ctrl): "
                "treats the guidance e = v_c − v_u as an error signal and adds a switching control −K·sign(s) with "
                "the sliding surface s = (e − e_prev) + λ·e_prev, so the guidance stays stable at large cfg instead "
                "of oscillating and overshooting. Then ordinary CFG with the corrected error. K is automatic by "
                "default: the official 0.2 on flow models, 0.02 on eps/v models (SD1.5, SDXL). The previous error "
                "restarts with every sampler call."),
            inputs=[
                model_input(),
                io.Float.Input("smc_lambda", default=5.0, min=0.0, max=50.0, step=0.05,
                               tooltip="λ, the decay rate of the sliding surface (official recommendation 5 for "
                                       "SD3.5, Flux, Qwen-Image and WAN; code default 0.05)."),
                io.Float.Input("smc_k", default=-1.0, min=-1.0, max=5.0, step=0.01,
                               tooltip="K, the switching gain in velocity (ε) units; 0 = plain CFG. −1 = automatic: "
                                       "0.2 on flow models (SD3.5, Flux, WAN, Qwen-Image: the official "
                                       "recommendation), 0.02 on eps/v models (SD1.5, SDXL: the pack's choice, "
                                       "their runs span ~15× more σ, so the same K moves the image ~15× further)."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, smc_lambda, smc_k):
        gain = None if smc_k < 0 else smc_k  # −1: automatic, resolved for the sampled model
        return io.NodeOutput(add_method(model, SMCCFG(smc_lambda, gain, cls.LABEL)))


NODES = [DynamicThresholdingNode, SkimmedCFGNode, PowerLawCFGNode, ADGNode, MomentumGuidanceNode, SMCCFGNode]
