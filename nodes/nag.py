"""NAG · Normalized Attention Guidance: a negative prompt that acts in attention space.

Chen, Bandyopadhyay, Zou, Song, "Normalized Attention Guidance: Universal Negative Guidance for
Diffusion Models" (NeurIPS 2025, arXiv 2505.21179; official code ChenDarYen/Normalized-Attention-Guidance
and ChenDarYen/ComfyUI-NAG). In every text attention of the model, for the prompt's rows:

    Z⁺ = Attn(Q, K⁺, V⁺)   (the prompt's text)      Z⁻ = Attn(Q, K⁻, V⁻)   (the NAG negative's text)
    Z  = α·Ẑ + (1 − α)·Z⁺,  Ẑ = Z̃·min(r, τ)/r,  Z̃ = s·Z⁺ − (s − 1)·Z⁻,  r = ‖Z̃‖₁ / ‖Z⁺‖₁ per token

(``guiders.attention_ops.nag_combine``). It works at cfg 1, where CFG cannot use a negative prompt
(distilled and few-step models), and together with CFG (then only the conditional rows get NAG, as in
the official code). The NAG negative's tokens enter the same model call as extra context tokens: no
second forward, only the extra attention (``contributors/nag.py``).

The node clones the MODEL and installs NAG's hooks; it does not touch the guidance plan, so it stacks
with every CFG-space and perturbation node and samples with KSampler, every sampler and the Guidance
Guider.
"""

from __future__ import annotations

import math

from comfy_api.latest import io

from ..guiders.schedules import ScheduleError
from .common import CATEGORY_ROOT, NODE_PREFIX, model_input, node_error, term_schedule
from .contributors import nag, nag_modulation
from .runtime.families import FamilyError, NagDefaults, nag_defaults, nag_family_of

CATEGORY_NAG = CATEGORY_ROOT + "/attention"
AUTO = -1.0


def resolve_settings(label: str, defaults: NagDefaults, scale: float, tau: float, alpha: float
                     ) -> tuple[float, float, float]:
    """The node's values with ``-1`` replaced by the family default; errors name the node and the fix."""
    scale = defaults.scale if scale == AUTO else float(scale)
    tau = defaults.tau if tau == AUTO else float(tau)
    alpha = defaults.alpha if alpha == AUTO else float(alpha)
    if not (math.isfinite(scale) and scale >= 1.0):
        raise node_error(f"{label}: scale must be ≥ 1 (1 = no guidance; the official values are 3–11), or -1 for "
                         f"the family default; got {scale}")
    if not (math.isfinite(tau) and tau >= 1.0):
        raise node_error(f"{label}: tau must be ≥ 1 (the bound on ‖Ẑ‖₁/‖Z⁺‖₁; official 2.5), or -1 for the family "
                         f"default; got {tau}")
    if not 0.0 <= alpha <= 1.0:
        raise node_error(f"{label}: alpha is a blend weight in [0, 1] (0 = no guidance), or -1 for the family "
                         f"default; got {alpha}")
    return scale, tau, alpha


def negative_tokens(label: str, conditioning) -> tuple:
    """(token tensor, per-token mask or None, pooled vector or None) of a NAG negative CONDITIONING with
    one entry."""
    import torch

    if not isinstance(conditioning, list) or not conditioning:
        raise node_error(f"{label}: nag_negative is empty; connect a CLIP Text Encode of what to avoid.")
    if len(conditioning) > 1:
        raise node_error(f"{label}: nag_negative has {len(conditioning)} conditioning entries (Conditioning Combine, "
                         f"areas or masks); NAG needs one text encoding. Connect a single CLIP Text Encode "
                         f"(Conditioning Concat joins two texts into one).")
    tokens, extra = conditioning[0][0], conditioning[0][1] if len(conditioning[0]) > 1 else {}
    if not (torch.is_tensor(tokens) and tokens.ndim == 3 and tokens.shape[1] > 0):
        raise node_error(f"{label}: nag_negative is not a text encoding (expected a [batch, tokens, channels] "
                         f"tensor); connect a CLIP Text Encode.")
    mask = extra.get("attention_mask") if isinstance(extra, dict) else None
    if mask is not None and not (torch.is_tensor(mask) and mask.ndim == 2 and mask.shape[1] == tokens.shape[1]):
        mask = None
    pooled = extra.get("pooled_output") if isinstance(extra, dict) else None
    if not (torch.is_tensor(pooled) and pooled.ndim == 2):
        pooled = None
    return tokens, mask, pooled


class NAGNode(io.ComfyNode):
    LABEL = "NAG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Normalized Attention Guidance (Chen et al., NeurIPS 2025): a negative prompt in attention space, `Z = '
        "α·norm_τ(s·Z⁺ − (s−1)·Z⁻) + (1−α)·Z⁺`; on Flux/SD3/HunyuanVideo the negative's text is modulated with its "
        'own pooled vector (as ComfyUI-NAG); works at cfg 1 (Flux schnell/dev, SD3.5 Turbo, SDXL Lightning/DMD2, '
        'distilled WAN) and with CFG; plain KSampler',
        'SD1.5/SDXL, Flux, Chroma, SD3/3.5, Qwen-Image, HunyuanVideo, WAN, LTXV, Cosmos Predict2, Lumina2/Z-Image',
        "none: the negative's tokens join the same call (per step at cfg 1 on tiny CPU models, "
        '`benchmarks/nag_cost.py`: +0–18% on cross-attention models, +26–57% on joint-attention DiTs)',
    )
    COMPARE = {"key": "nag"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "NAG",
            display_name="NAG · Normalized Attention Guidance",
            category=CATEGORY_NAG,
            description=(
                "Normalized Attention Guidance (Chen et al., NeurIPS 2025): a negative prompt that works where CFG "
                "cannot — few-step and CFG-distilled models at cfg 1 (Flux schnell/dev, SD3.5 Turbo, SDXL "
                "Lightning/DMD2, distilled WAN) — and alongside CFG. In every text attention the prompt's "
                "attention output Z⁺ is pushed away from the output Z⁻ for the NAG negative's text: "
                "Z̃ = s·Z⁺ − (s − 1)·Z⁻, its L1 norm per token capped at tau × ‖Z⁺‖₁, blended with Z⁺ by alpha. "
                "The negative's tokens run in the same model call (no second forward); with CFG only the "
                "conditional rows get NAG. Works on SD1.5/SDXL, Flux, Chroma, SD3/3.5, Qwen-Image, HunyuanVideo, "
                "WAN 2.1/2.2, LTXV, Cosmos Predict2 and Lumina2/Z-Image (Z-Image-Turbo at cfg 1), with KSampler, "
                "every sampler and the Guidance Guider."),
            inputs=[
                model_input(),
                io.Conditioning.Input(
                    "nag_negative",
                    tooltip="What to steer away from, encoded with the same text encoder as the prompt (e.g. "
                            "'blurry, low quality, watermark'). Its text tokens enter the attention; on Flux, SD3 and "
                            "HunyuanVideo its pooled vector modulates those tokens (as the official ComfyUI-NAG). "
                            "Independent of the sampler's negative prompt, which CFG keeps using."),
                io.Float.Input(
                    "scale", default=AUTO, min=AUTO, max=100.0, step=0.1, round=0.01,
                    tooltip="Extrapolation scale s (Z̃ = s·Z⁺ − (s − 1)·Z⁻). -1 = the family default (Flux, Chroma, "
                            "SD3.5, SD1.5: 5; SDXL: 3; WAN, HunyuanVideo: 9; Lumina2/Z-Image: 2). 1 = off (no extra "
                            "cost). Higher = "
                            "stronger negative guidance; tune this one first."),
                io.Float.Input(
                    "tau", default=AUTO, min=AUTO, max=10.0, step=0.05, round=0.01,
                    tooltip="Normalisation bound τ: per token, ‖Z̃‖₁ is capped at τ·‖Z⁺‖₁. -1 = the family "
                            "default (2.5 everywhere; official 4-step WAN: 3.5). Higher = stronger; lower it for "
                            "image-to-video and multi-step models with high cfg."),
                io.Float.Input(
                    "alpha", default=AUTO, min=AUTO, max=1.0, step=0.01, round=0.01,
                    tooltip="Blend α of the normalised features with Z⁺ (1 = the normalised features only, 0 = "
                            "off). -1 = the family default (Flux, WAN: 0.25; SD3.5: 0.125; SDXL: 0.5; SD1.5: 0.38; "
                            "HunyuanVideo: 0.12). Higher = stronger."),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="NAG acts from this progress (ComfyUI's percent of sigma, 0 = pure noise, as core "
                            "nodes' start_percent). Outside its window the "
                            "negative's tokens are not added (no extra cost)."),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="NAG acts until this progress (ComfyUI's percent of sigma, 1 = sigma 0)."),
                io.Float.Input(
                    "sigma_end", default=0.0, min=0.0, max=1000.0, step=0.01, round=0.001,
                    tooltip="NAG acts only while sigma > sigma_end (the official nag_sigma_end; 0 = to the end). "
                            "Official speed-ups with near-identical results: 0.75 on flow models (Flux, SD3.5, "
                            "Chroma), 4 on SDXL/SD1.5."),
            ],
            outputs=[io.Model.Output(tooltip="The model with NAG installed (the input model is unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, scale=AUTO, tau=AUTO, alpha=AUTO, start_percent=0.0, end_percent=1.0, **kwargs):
        try:
            resolve_settings(cls.LABEL, NagDefaults(1.0, 1.0, 0.0, ""), scale, tau, alpha)
            term_schedule(cls.LABEL, "constant", start_percent, end_percent)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, nag_negative, scale, tau, alpha, start_percent, end_percent, sigma_end):
        try:
            spec = nag_family_of(model, cls.LABEL)
        except FamilyError as e:
            raise node_error(str(e)) from None
        scale, tau, alpha = resolve_settings(cls.LABEL, nag_defaults(model, spec), scale, tau, alpha)
        try:
            window = term_schedule(cls.LABEL, "constant", start_percent, end_percent, float(sigma_end)).window
        except ScheduleError as e:
            raise node_error(str(e)) from None
        tokens, mask, pooled = negative_tokens(cls.LABEL, nag_negative)
        modulation = nag_modulation.for_family(spec, pooled, cls.LABEL)
        settings = nag.NagSettings(cls.LABEL, spec, scale, tau, alpha, window, tokens, mask, modulation)
        patched = model.clone()
        try:
            nag.install(patched, spec, settings)
            if modulation is not None:
                nag_modulation.install(patched, modulation)
        except FamilyError as e:
            raise node_error(str(e)) from None
        return io.NodeOutput(patched)


NODES = [NAGNode]
