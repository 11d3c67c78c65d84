"""Spatial methods: Sliding Window Guidance (the weak branch is the model on overlapping crops, stitched)."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY_ROOT, NODE_PREFIX, model_input, model_output, node_error
from .contributors.sliding_window import CropWindows
from .perturbation import Defaults, _scale_input, _term_inputs, add_branch_term
from .runtime.families import FamilyError, diffusion_model_of, family_of

CATEGORY_SPATIAL = CATEGORY_ROOT + "/perturbation"


def spatial_alignment(model, spec) -> int:
    """The latent cells a crop side must be a multiple of: the UNet's total downsampling, a DiT's patch size."""
    if spec.is_unet:
        from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

        net = diffusion_model_of(model)
        return 2 ** sum(isinstance(m, Downsample) for m in net.input_blocks.modules())
    return max(spec.patch[-2:])


class SWGNode(io.ComfyNode):
    LABEL = "SWG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "Sliding Window Guidance (Kaiser et al., arXiv 2411.10257): the weak branch is the model on overlapping "
        "crops of the latent, stitched (mean over covering crops); no extra training, works at cfg 1",
        'block families¹ (no spatial conditioning inputs)',
        '+1 forward of crop rows (windows² rows of fraction² size)',
    )
    COMPARE = {"key": "swg"}
    DEFAULTS = Defaults(scale=1.0)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SWG",
            display_name="SWG · Sliding Window Guidance",
            category=CATEGORY_SPATIAL,
            description=(
                "Sliding Window Guidance (Kaiser et al., arXiv 2411.10257): the weak prediction is the same model "
                "run on overlapping crops of the latent (each side crop_fraction of the latent's, "
                "windows_per_side² crops), stitched back with the mean over the crops covering each position; "
                "the result is pushed away from it: D = CFG + scale·(cond − cond_SWG). Every crop of every "
                "window is one row of a single extra model call per step (crops cannot share the full-size "
                "call's tensor). Improves global structure without training; works at cfg 1. Refuses "
                "conditioning with spatial inputs (inpainting/reference latents, control images)."),
            inputs=[
                model_input(),
                _scale_input(cls.DEFAULTS, "Strength of the SWG term (at cfg 1, SWG's guidance w = 1 + scale). 1 = "
                                           "the pack's default with CFG on SD1.5/SDXL; 0 = off (no extra cost)."),
                io.Float.Input("crop_fraction", default=0.75, min=0.25, max=1.0, step=0.05, round=0.01,
                               tooltip="Side of each crop as a fraction of the latent's side (rounded down to the "
                                       "model's patch / downsampling grid). Smaller crops = a weaker branch, a "
                                       "stronger effect on global structure. 1 = no crop (the branch equals cond)."),
                io.Int.Input("windows_per_side", default=2, min=1, max=4,
                             tooltip="Crops per axis, spread evenly from edge to edge (2 = four crops, the corners). "
                                     "Cost: windows_per_side² rows of crop_fraction² size each."),
                *_term_inputs(cls.DEFAULTS),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, scale, crop_fraction, windows_per_side, schedule, start_percent, end_percent):
        try:
            spec = family_of(model, cls.LABEL)
        except FamilyError as e:
            raise node_error(str(e)) from None
        if not 0.0 < crop_fraction <= 1.0 or windows_per_side < 1:
            raise node_error(f"{cls.LABEL}: crop_fraction must be in (0, 1] and windows_per_side at least 1.")
        effect = CropWindows(cls.LABEL, float(crop_fraction), int(windows_per_side), spatial_alignment(model, spec))
        return io.NodeOutput(add_branch_term(model, cls.LABEL, effect, scale, schedule, start_percent, end_percent))


NODES = [SWGNode]
