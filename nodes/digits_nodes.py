"""Nodes for the embedded digits model: try every guidance method in the editor with no download.

``Digits Model Loader`` gives the small class-conditional model shipped with the pack (8×8 digits,
SD1.5's UNet class and sigma schedule) with the CONDITIONING of one digit and of the null class;
``Digits Decode`` turns its 8×8 latents into a viewable IMAGE. See ``digits/model.py``.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..digits.model import (
    EMPTY_LATENT_SIZE,
    NULL_CLASS,
    UNET_WEIGHTS,
    WEAK_UNET_WEIGHTS,
    DigitsWeightsError,
    cached_digits_model,
)
from ..digits.sampling import latents_to_images
from .common import CATEGORY_ROOT, NODE_PREFIX, node_error

CATEGORY_EMBEDDED = CATEGORY_ROOT + "/embedded"
WEIGHTS = {"digits": UNET_WEIGHTS, "digits weak (for Autoguidance)": WEAK_UNET_WEIGHTS}


class DigitsModelLoader(io.ComfyNode):
    LABEL = "Digits Model Loader"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'the embedded test model (above) as MODEL + class CONDITIONING, and its 8×8 latents as an IMAGE',
        '—',
        '—',
    )

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "DigitsModelLoader",
            display_name="Digits Model Loader · embedded test model (Guidance Kit)",
            category=CATEGORY_EMBEDDED,
            description=(
                "Loads the small class-conditional diffusion model that ships with Guidance Kit (ComfyUI's SD1.5 "
                "UNet class at 8×8 pixels, trained on scikit-learn's handwritten digits; ε-prediction with SD1.5's "
                "sigmas), so every guidance node can be tried in seconds on CPU with no download. Outputs the "
                "MODEL, the CONDITIONING of the chosen digit (positive) and of the null class (negative, the "
                "'empty prompt'). Use an Empty Latent Image of 64×64 (it becomes the model's 1×8×8 latent) and "
                "Digits Decode to see the result. The 'weak' weights are the same UNet trained 1/12 as long "
                "(same class embedding): the weak model of the Autoguidance node."),
            inputs=[
                io.Int.Input("digit", default=3, min=0, max=9,
                             tooltip="The digit to draw (0–9): the class embedding used as the positive "
                                     "conditioning."),
                io.Combo.Input("weights", options=list(WEIGHTS), default="digits", optional=True,
                               tooltip="'digits': the trained model. 'digits weak': the same network trained 1/12 "
                                       "as long, reading the same conditioning: connect it as the weak_model of "
                                       "Autoguidance (guide the trained model away from it)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The digits diffusion model (CPU-friendly, fp32)."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The chosen digit's class embedding as a one-token context."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip=f"The null class (index {NULL_CLASS}, trained with label dropout): "
                                               f"the unconditional prediction of CFG."),
            ],
        )

    @classmethod
    def validate_inputs(cls, digit=3, weights="digits", **kwargs):
        if not 0 <= int(digit) <= 9:
            return f"{cls.LABEL}: digit must be 0–9, got {digit}"
        if weights not in WEIGHTS:
            return f"{cls.LABEL}: weights must be one of {list(WEIGHTS)}, got {weights!r}"
        return True

    @classmethod
    def execute(cls, digit, weights="digits"):
        try:
            loaded = cached_digits_model(WEIGHTS[weights])
        except DigitsWeightsError as e:
            raise node_error(str(e)) from None
        return io.NodeOutput(loaded.patcher, loaded.conditioning([int(digit)]), loaded.null_conditioning())


class DigitsDecode(io.ComfyNode):
    LABEL = "Digits Decode"
    README_JOIN = 'GuidanceKit_DigitsModelLoader'  # listed in that node's row of the README methods table

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "DigitsDecode",
            display_name="Digits Decode · 8×8 latent to image (Guidance Kit)",
            category=CATEGORY_EMBEDDED,
            description=(
                "Shows the digits model's latents (the 8×8 images themselves, no VAE): ink black on white, "
                "pixels enlarged with nearest-neighbour scaling. Values beyond [-1, 1] (oversaturation from strong "
                "guidance) are clipped."),
            inputs=[
                io.Latent.Input("samples", tooltip=f"Latents from a sampler run on the Digits Model Loader's model "
                                                   f"(Empty Latent Image {EMPTY_LATENT_SIZE}×{EMPTY_LATENT_SIZE})."),
                io.Int.Input("scale", default=8, min=1, max=64,
                             tooltip="Enlargement factor: 8 gives 64×64 pictures of the 8×8 digits."),
            ],
            outputs=[io.Image.Output(tooltip="The digits as an IMAGE batch.")],
        )

    @classmethod
    def execute(cls, samples, scale):
        latents = samples["samples"]
        if latents.ndim == 5 and latents.shape[2] == 1:
            latents = latents.squeeze(2)
        try:
            images = latents_to_images(latents, int(scale))
        except ValueError as e:
            raise node_error(f"{cls.LABEL}: {e}. Connect the latent of a sampler that ran the Digits Model "
                             f"Loader's model on an Empty Latent Image of {EMPTY_LATENT_SIZE}×{EMPTY_LATENT_SIZE}.") \
                from None
        return io.NodeOutput(images)


NODES = [DigitsModelLoader, DigitsDecode]
