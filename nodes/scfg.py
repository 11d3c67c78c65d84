"""S-CFG · Semantic-aware CFG: per-region CFG scales from the model's own attention maps.

Shen et al., "Rethinking the Spatial Inconsistency in Classifier-Free Diffusion Guidance", CVPR 2024
(official code SmilesDZgk/S-CFG). Each step the conditional forward's cross-attention maps (completed
by self-attention) split the image into one region per text token; every region's CFG weight is
rescaled so that its mean guidance norm equals the foreground's: ``D = U + w·r(x)·(C − U)``. The math
is ``guiders/region_guidance.py``; the maps are read by ``contributors/regions.py`` inside the same
batched model call (no extra model pass).

Two nodes:

* ``GuidanceKit_SCFG`` (MODEL → MODEL): adds S-CFG (``guiders/methods/scfg.py``) to the guidance plan
  (so it stacks with APG, TCFG, FDG, schedules and perturbation terms, with KSampler and the Guidance
  Guider) and installs the map readers.
* ``GuidanceKit_SCFGMap`` (MODEL + LATENT → IMAGE): the region map or the scale map of the last run.
  A model-patch node cannot output the map itself: the maps exist only while the sampler runs, after
  the patch node has finished. The patched model carries a ``RegionMapStore`` (shared by all clones of
  that model) that the engine fills during sampling; the map node reads it. Its LATENT input is the
  sampler's output, which makes ComfyUI run it after the sampler.
"""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from ..guiders.layers import LayerError, parse_layers, resolve
from ..guiders.methods.scfg import SCFG
from ..guiders.plan import PlanError
from ..guiders.region_guidance import REFERENCES, RegionMapStore, region_colors
from ..guiders.schedules import ScheduleError, Window
from .common import CATEGORY_ROOT, NODE_PREFIX, add_method, model_input, node_error
from .contributors import regions
from .contributors.regions import REGION_STORE_KEY
from .runtime.blocks import block_layout
from .runtime.families import FamilyError, FamilySpec, scfg_family_of

CATEGORY_SCFG = CATEGORY_ROOT + "/attention"
AUTO = "auto"
REFERENCE_OPTIONS = [AUTO, *REFERENCES]
SHOW_OPTIONS = ["regions", "scale"]


ONE_TOKEN_MESSAGE = ("S-CFG: the prompt's conditioning has a single token (a class-conditional model such as the "
                     "embedded digits model), so the whole image is one semantic region, every region factor is 1 "
                     "and S-CFG is exactly CFG in this run. S-CFG needs a text prompt of several tokens (SD1.5/SDXL, "
                     "SD3/3.5, Flux, Chroma).")


class SCFGMapStore(RegionMapStore):
    """The S-CFG node's map store: records the maps (for 'S-CFG Map') and warns once per run when the
    conditioning has one token, where S-CFG cannot differ from CFG."""

    def record(self, run: object, regions) -> None:
        super().record(run, regions)
        if regions.tokens < 2 and hasattr(run, "warn_once"):
            run.warn_once("scfg-one-token", ONE_TOKEN_MESSAGE)


def resolve_reference(reference: str, spec: FamilySpec) -> str:
    """``auto``: the official foreground split where the text starts with CLIP's [SOT] token (UNet,
    SD3), the whole image for T5-only families (Flux, Chroma), whose first token is a word."""
    if reference != AUTO:
        return reference
    return REFERENCES[0] if spec.scfg_start_token else "whole image"


def unet_reader_layers(label: str, layers: str, model, spec: FamilySpec) -> tuple[tuple, ...]:
    """The UNet transformer layers S-CFG reads (``unet_layers`` in the layer syntax), an error naming the node."""
    try:
        keys = resolve(parse_layers(layers, label), block_layout(model, spec), label)
    except LayerError as e:
        raise node_error(str(e)) from None
    if not keys:
        raise node_error(f"{label}: unet_layers '{layers}' selects no transformer layer on {spec.name}")
    return keys


def build_settings(label: str, downsample: int, order: int, reference: str, rate_min: float, rate_max: float,
                   max_weight: float, smoothing: bool, dit_blocks: int, start_percent: float,
                   end_percent: float) -> SCFG:
    if reference not in REFERENCES:
        raise node_error(f"{label}: reference must be one of {', '.join(REFERENCE_OPTIONS)}; got {reference!r}")
    for name, value in (("rate_min", rate_min), ("rate_max", rate_max), ("max_weight", max_weight)):
        if not math.isfinite(value):
            raise node_error(f"{label}: {name} must be a finite number")
    settings = SCFG(int(downsample), int(order), reference, float(rate_min), float(rate_max), float(max_weight),
                    bool(smoothing), int(dit_blocks), Window(start=float(start_percent), end=float(end_percent)),
                    label)
    try:
        settings.validate()
    except (PlanError, ScheduleError) as e:
        raise node_error(str(e)) from None
    return settings


class SCFGNode(io.ComfyNode):
    LABEL = "S-CFG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "Semantic-aware CFG (Shen et al., CVPR 2024): the CFG weight becomes a per-region map from the model's own "
        "cross-/self-attention (official rule: regions matched to the foreground's mean guidance norm, r ∈ [0.8, "
        '3], cfg·r ≤ 15); the map node shows the regions or scales of the last run; on a one-token conditioning '
        '(class-conditional models) it equals CFG and says so',
        'SD1.5/SDXL, Flux, Chroma, SD3/3.5, Lumina2/Z-Image; video with per-frame regions: HunyuanVideo, WAN, LTXV',
        'none: maps read inside the same call, no N×N attention matrix (tiny CPU models: +22…73% per step, mostly '
        'fixed overhead)',
    )
    # on the digits model write scfg:downsample=2 (its attention is at 8×8 and 4×4 only)
    COMPARE = {"key": "scfg", "aliases": {"s-cfg": "scfg", "s_cfg": "scfg"},
               "not_in_report": "equals CFG on the digits model: its one-token class context makes the whole image "
                                "one semantic region (r = 1 everywhere); a row for checkpoints with real prompts"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SCFG",
            display_name="S-CFG · Semantic-aware CFG (per-region scales)",
            category=CATEGORY_SCFG,
            description=(
                "S-CFG (Shen et al., CVPR 2024): CFG with one scale per semantic region instead of one per image. "
                "Each step the prompt's cross-attention maps (completed by self-attention) assign every latent "
                "patch to a text token; each region's guidance is rescaled so its mean strength matches the "
                "foreground's (clamped to [0.8, 3]×cfg, at most 15 in total): D = U + cfg·r(x)·(C − U). Evens out "
                "under-guided objects and over-guided background. Maps are read inside the same batched model "
                "call (no extra pass, no N×N matrices). SD1.5/SDXL, Flux, Chroma, SD3/3.5, Lumina2; per frame on "
                "HunyuanVideo, WAN and LTXV; needs cfg > 1. "
                "Stacks with APG, TCFG, FDG, schedules and perturbation terms (KSampler or Guidance Guider). See the "
                "region map with 'S-CFG Map'."),
            inputs=[
                model_input(),
                io.Int.Input(
                    "downsample", default=4, min=1, max=16,
                    tooltip="Resolution of the region map: the latent size divided by this (official 4: the 16×16 "
                            "map of SD1.5 at 512 px, built from its 16×16 and 8×8 attention layers; SDXL at 1024 px: "
                            "the 32×32 layers). UNets read every layer at this resolution or coarser; DiTs pool "
                            "their token grid to it. Smaller = finer regions, more layers read."),
                io.Int.Input(
                    "self_attention_order", default=4, min=0, max=8,
                    tooltip="Self-attention completion of the maps, official 4: maps ← ((S + 3·S²)/4)·maps with S "
                            "the layer's self-attention (computed as attention calls, never as an N×N matrix). 0 "
                            "= raw cross-attention maps (cheaper, noisier regions)."),
                io.Combo.Input(
                    "reference", options=REFERENCE_OPTIONS, default=AUTO,
                    tooltip="The region whose mean guidance norm every region is matched to. 'foreground "
                            "(uncond)' = official: patches where the uncond forward's attention to the other "
                            "tokens beats its [SOT] token. 'foreground (cond)': the same split from the prompt's "
                            "forward. 'whole image': the mean over all patches. auto = official on SD1.5/SDXL/SD3, "
                            "whole image on Flux/Chroma (T5 has no [SOT] token)."),
                io.Float.Input(
                    "rate_min", default=0.8, min=0.0, max=10.0, step=0.05,
                    tooltip="Lower clamp of a region's factor r (official 0.8): no region is guided less than "
                            "rate_min × cfg."),
                io.Float.Input(
                    "rate_max", default=3.0, min=0.0, max=10.0, step=0.05,
                    tooltip="Upper clamp of a region's factor r (official 3.0)."),
                io.Float.Input(
                    "max_weight", default=15.0, min=0.0, max=100.0, step=0.5,
                    tooltip="Cap on the effective weight cfg·r (official 15: r ≤ 15/cfg). 0 disables the cap."),
                io.Boolean.Input(
                    "smoothing", default=True,
                    tooltip="3×3 Gaussian smoothing of the scale map (official), so region borders do not leave "
                            "seams."),
                io.Int.Input(
                    "dit_blocks", default=3, min=1, max=64,
                    tooltip="DiTs only: read the maps from the last N blocks (Flux, Chroma, SD3, HunyuanVideo: "
                            "joint double blocks; Lumina2: main layers; WAN, LTXV: their cross-attention). "
                            "Each read block costs about two extra attention calls per prompt row. Ignored on "
                            "UNets."),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="S-CFG acts from this progress (ComfyUI's percent of sigma; official: every step). "
                            "Outside the "
                            "window the step is plain CFG and no map is read."),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="S-CFG acts until this progress (ComfyUI's percent of sigma, 1 = sigma 0)."),
                io.Int.Input(
                    "single_blocks", default=0, min=0, max=64, optional=True,
                    tooltip="Flux, Chroma, HunyuanVideo: also read the maps from the last N single blocks (text and "
                            "image in one stream, after the double blocks). 0 = the double blocks only. Each read "
                            "block costs about two extra attention calls per prompt row."),
                io.String.Input(
                    "unet_layers", default=AUTO, optional=True,
                    tooltip="SD1.5/SDXL only: the transformer layers whose maps are read, in the perturbation "
                            "nodes' layer syntax ('middle all', 'input 7-8, middle 0'); auto = every layer at "
                            "1/downsample or coarser (official). Layers at a finer resolution are still skipped. On "
                            "SDXL at 1024 px auto reads 60 layers; 'middle all' reads 10 and costs far less."),
            ],
            outputs=[io.Model.Output(tooltip="The model with S-CFG in its guidance plan (the input model is "
                                             "unchanged). Feed it to a sampler, and the same model to 'S-CFG Map' "
                                             "to see the regions.")],
        )

    @classmethod
    def validate_inputs(cls, reference=AUTO, rate_min=0.8, rate_max=3.0, start_percent=0.0, end_percent=1.0,
                        **kwargs):
        if reference not in REFERENCE_OPTIONS:
            return f"{cls.LABEL}: reference must be one of {', '.join(REFERENCE_OPTIONS)}; got {reference!r}"
        if rate_min > rate_max:
            return f"{cls.LABEL}: rate_min ({rate_min}) must not exceed rate_max ({rate_max})"
        if start_percent > end_percent:
            return f"{cls.LABEL}: the window is empty: start_percent ({start_percent}) is after end_percent " \
                   f"({end_percent})"
        return True

    @classmethod
    def execute(cls, model, downsample, self_attention_order, reference, rate_min, rate_max, max_weight, smoothing,
                dit_blocks, start_percent, end_percent, single_blocks=0, unet_layers=AUTO):
        try:
            spec = scfg_family_of(model, cls.LABEL)
        except FamilyError as e:
            raise node_error(str(e)) from None
        if reference not in REFERENCE_OPTIONS:
            raise node_error(f"{cls.LABEL}: reference must be one of {', '.join(REFERENCE_OPTIONS)}; "
                             f"got {reference!r}")
        settings = build_settings(cls.LABEL, downsample, self_attention_order, resolve_reference(reference, spec),
                                  rate_min, rate_max, max_weight, smoothing, dit_blocks, start_percent, end_percent)
        unet_keys = None
        if spec.is_unet and unet_layers.strip().lower() != AUTO:
            unet_keys = unet_reader_layers(cls.LABEL, unet_layers, model, spec)
        patched = add_method(model, settings)
        try:
            regions.install(patched, spec, settings.dit_blocks, int(single_blocks), unet_keys)
        except FamilyError as e:
            raise node_error(str(e)) from None
        patched.model_options[REGION_STORE_KEY] = SCFGMapStore()
        return io.NodeOutput(patched)


def map_image(store: RegionMapStore, show: str, step: int, size: tuple[int, int], label: str) -> torch.Tensor:
    """[B, H, W, 3] float32 in [0, 1]: the regions (a colour per text token; [SOT] dark) or the scale
    map (brighter = stronger guidance, normalised per image), nearest-upscaled to ``size``."""
    regions = store.get(step)
    if regions is None:
        which = "the last step" if step < 0 else f"step {step}"
        raise node_error(f"{label}: no S-CFG map recorded for {which} of this model. Connect the MODEL output of the "
                         f"S-CFG node (or a model patched after it) and the LATENT output of the sampler that used it, "
                         f"and run the workflow; 'step' counts from 0 (−1 = last step, {len(store.steps)} recorded).")
    if show == "regions":
        image = region_colors(regions.assignment.cpu(), regions.tokens)  # [B, h, w, 3]
        image = image.permute(0, 3, 1, 2)
    else:
        if regions.scale is None:
            raise node_error(f"{label}: the scale map of this step was not computed (guidance was off there).")
        scale = regions.scale.detach().float().cpu()
        lo = scale.amin(dim=(1, 2, 3), keepdim=True)
        hi = scale.amax(dim=(1, 2, 3), keepdim=True)
        image = ((scale - lo) / (hi - lo).clamp_min(1e-6)).expand(-1, 3, -1, -1)
    image = torch.nn.functional.interpolate(image.float(), size=size, mode="nearest")
    return image.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


class SCFGMapNode(io.ComfyNode):
    LABEL = "S-CFG Map"
    README_JOIN = 'GuidanceKit_SCFG'  # listed in that node's row of the README methods table

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SCFGMap",
            display_name="S-CFG Map · region / scale map of the last run",
            category=CATEGORY_SCFG,
            description=(
                "Shows what S-CFG did in the last sampling run of an S-CFG-patched model: the semantic regions "
                "(one colour per text token, the [SOT]/background token dark) or the per-pixel CFG scale map "
                "(brighter = stronger guidance). The maps exist only during sampling, so connect the sampler's "
                "LATENT output here: that makes this node run after the sampler."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of the S-CFG node (or any model patched after it) "
                                                "that the sampler used."),
                io.Latent.Input("samples", tooltip="The sampler's LATENT output (only to run after the sampler; "
                                                   "its size sets the image size: latent × 8)."),
                io.Combo.Input("show", options=SHOW_OPTIONS, default="regions",
                               tooltip="regions: the token region of each patch. scale: the factor r(x) that "
                                       "multiplied cfg (normalised per image)."),
                io.Int.Input("step", default=-1, min=-1, max=10000,
                             tooltip="Which sampling step (0 = first); −1 = the last step where S-CFG acted."),
            ],
            outputs=[io.Image.Output(tooltip="The map as an IMAGE, nearest-upscaled to the latent size × 8.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # the store changes with every run of the sampler: never reuse a cached map

    @classmethod
    def validate_inputs(cls, show="regions", **kwargs):
        if show not in SHOW_OPTIONS:
            return f"{cls.LABEL}: show must be one of {', '.join(SHOW_OPTIONS)}; got {show!r}"
        return True

    @classmethod
    def execute(cls, model, samples, show, step):
        store = model.model_options.get(REGION_STORE_KEY)
        if not isinstance(store, RegionMapStore):
            raise node_error(f"{cls.LABEL}: this model has no S-CFG node; connect the MODEL output of "
                             f"'S-CFG · Semantic-aware CFG'.")
        latent = samples["samples"] if isinstance(samples, dict) else samples
        size = (int(latent.shape[-2]) * 8, int(latent.shape[-1]) * 8)
        return io.NodeOutput(map_image(store, show, int(step), size, cls.LABEL))


NODES = [SCFGNode, SCFGMapNode]
