"""Self-Attention Guidance (SAG): the uncond x0 blurred where the UNet's middle self-attention attends, evaluated
again after the batched call (it depends on this step's uncond prediction)."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY_ROOT, NODE_PREFIX, model_input, model_output, node_error
from .contributors import self_attention_blur
from .perturbation import Defaults, _scale_input, _term_inputs, add_branch_term
from .runtime.families import FamilyError, family_of

CATEGORY_SAG = CATEGORY_ROOT + "/attention"


class SAGNode(io.ComfyNode):
    LABEL = "SAG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "Self-Attention Guidance (Hong et al., ICCV 2023): the uncond x0 blurred where the middle block's "
        "(image) self-attention attends, re-noised and evaluated again; D = CFG + scale·(blurred − SAG prediction)",
        'SD1.5/SDXL (UNet), Flux, SD3/SD3.5 (middle double block); other DiTs refused',
        '+1 forward of the uncond rows, after the batched call (it needs its prediction)',
    )
    COMPARE = {"key": "sag"}
    DEFAULTS = Defaults(scale=1.0)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SAG",
            display_name="SAG · Self-Attention Guidance",
            category=CATEGORY_SAG,
            description=(
                "Self-Attention Guidance (Hong et al., ICCV 2023), the mechanism of ComfyUI core's node, on the "
                "pack's runtime: the self-attention map of the UNet's middle block is recorded for the uncond "
                "rows; where the summed attention exceeds 1, the uncond x0 is Gaussian-blurred; it is re-noised "
                "with the uncond's own noise and evaluated again, and D = CFG + scale·(blurred − SAG prediction). "
                "The degraded evaluation depends on this step's uncond prediction, so it is a second model call "
                "per step (all its rows in one call), not a row of the batched one. UNet models (SD1.5, SDXL); on "
                "Flux and SD3/SD3.5 the map is the image tokens' attention over the image tokens in the middle "
                "double block (the pack's choice; the paper has no DiT setting), re-noised by the flow schedule. "
                "Other DiT families are refused. Needs cfg > 1 (it blurs the uncond)."),
            inputs=[
                model_input(),
                _scale_input(cls.DEFAULTS, "Strength of the SAG term (the paper's s). 1 = the official SD pipeline's "
                                           "default (SD1.5/SDXL); core's node uses 0.5 with blur_sigma 2. "
                                           "0 = off (no extra cost)."),
                io.Float.Input("blur_sigma", default=1.0, min=0.1, max=10.0, step=0.1, round=0.01,
                               tooltip="σ of the 9×9 Gaussian blur of the attended regions, in latent pixels. "
                                       "1 = the official SD pipeline's (kernel 9, σ 1); core's node uses 2. "
                                       "Larger = a stronger degradation."),
                *_term_inputs(cls.DEFAULTS),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, schedule, start_percent, end_percent):
        try:
            spec = family_of(model, cls.LABEL)
        except FamilyError as e:
            raise node_error(str(e)) from None
        if not spec.is_unet and spec.name not in self_attention_blur.DIT_FAMILIES:
            raise node_error(
                f"{cls.LABEL}: {spec.name} is a DiT without the joint double blocks SAG reads its attention map "
                f"from (the pack supports UNet models (SD1.5, SDXL), Flux and SD3/SD3.5). On this family use PAG, "
                f"SEG or SWG, which degrade the attention or the input in the batched call.")
        if not blur_sigma > 0:
            raise node_error(f"{cls.LABEL}: blur_sigma must be above 0.")
        effect = self_attention_blur.SAGDegradation(cls.LABEL, float(blur_sigma))
        patched = add_branch_term(model, cls.LABEL, effect, scale, schedule, start_percent, end_percent,
                                  source="uncond")
        try:
            self_attention_blur.install(patched, spec)
        except FamilyError as e:
            raise node_error(str(e)) from None
        patched.model_options["disable_cfg1_optimization"] = True
        return io.NodeOutput(patched)


NODES = [SAGNode]
