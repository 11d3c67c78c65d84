"""Which ComfyUI diffusion models the block hooks serve: matched by the exact class, never by a base class.

A family is served only when the diffusion model's own class (module + name) is one whose block
calls the hooks were verified against (``FAMILIES``). Newer ComfyUI versions subclass served classes
for models whose blocks take other arguments (LTX-2's ``LTXAVModel(LTXVModel)`` passes a (video,
audio) tuple as ``img``; ``WanAnimate2Model(WanModel)`` splits its self-attention per frame), so a
match through the MRO would install hooks that crash or silently act on the wrong call at sampling
time. An unknown subclass of a served class is therefore refused at the node, with a message that
names its class and module, the family it derives from and what works instead (``family_of``).

The table (exact classes, ComfyUI 0.3.64 and 0.38):

==================  ====================================================================================
Family              classes (``comfy.ldm.<module>.<class>``)
==================  ====================================================================================
UNet (SD1.5/SDXL)   modules.diffusionmodules.openaimodel.UNetModel (SD1.x, SD2.x, SDXL, SVD, the digits
                    model)
Flux                flux.model.Flux (Flux.1, Kontext; Flux 2 and LongCat-Image reuse it)
Chroma              chroma.model.Chroma
Chroma Radiance     chroma_radiance.model.ChromaRadiance
SD3/SD3.5           modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper (how ComfyUI builds SD3)
AuraFlow            aura.mmdit.MMDiT
WAN                 wan.model.WanModel / VaceWanModel / CameraWanModel / HumoWanModel,
                    wan.model_animate.AnimateWanModel (WanModel_S2V: refused, its blocks get no
                    transformer_options)
HunyuanVideo        hunyuan_video.model.HunyuanVideo (also HunyuanVideo 1.5 and HunyuanImage 2.1)
Qwen-Image          qwen_image.model.QwenImageTransformer2DModel
LTXV                lightricks.model.LTXVModel, lightricks.model.LTXVImageModel (0.38; same block)
Cosmos Predict2     cosmos.predict2.MiniTrainDIT (NAG only)
==================  ====================================================================================
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass


class FamilyError(ValueError):
    """A method asked for on a model family it cannot serve."""


@dataclass(frozen=True)
class FamilySpec:
    """How a family's blocks are addressed and how tokens are laid out inside its attention."""

    name: str
    kind: str  # "unet" | "dit"
    groups: tuple[tuple[str, str], ...] = ()  # (selection group, diffusion_model attribute) for DiTs
    joint: bool = False  # text tokens share the self-attention call with image tokens
    image_first: bool = False  # joint order: [image, text] instead of [text, image]
    rope: bool = True  # positions applied inside every block (token shuffling needs this)
    patch: tuple[int, ...] = (2, 2)  # (h, w) or (t, h, w) patch size of image tokens
    transformer_options_in_blocks: bool = True
    # NAG: how the text reaches the image tokens. "attn2" (UNet cross-attention replace), "cross"
    # (separate cross-attention modules named ``cross_attention``), "joint" (text tokens in the
    # block's self-attention); "" = no NAG hook for this family.
    nag: str = ""
    cross_attention: str = ""
    text_pe_token_dim: int | None = None  # rotary table's token dim when text tokens have distinct positions
    text_refiner: str = ""  # diffusion_model attribute that mixes text tokens before the blocks (HunyuanVideo)
    text_mask: str = "padding"  # the model input 'attention_mask': "padding" (one entry per text token) | "regional"
    # (group, child) the blocks of a group must have: the module whose attention the hooks reach
    # (checked at install, so a rebuilt model is an error naming the family, not a crash while sampling)
    block_parts: tuple[tuple[str, str], ...] = ()

    @property
    def is_unet(self) -> bool:
        return self.kind == "unet"


def _ldm(path: str) -> str:
    return "comfy.ldm." + path


_FLUX_PARTS = (("double", "img_attn"), ("single", "linear1"))
_FLUX_LIKE = dict(kind="dit", groups=(("double", "double_blocks"), ("single", "single_blocks")), joint=True,
                  nag="joint", text_mask="regional", block_parts=_FLUX_PARTS)
_WAN = dict(kind="dit", groups=(("double", "blocks"),), patch=(1, 2, 2), nag="cross", cross_attention="cross_attn",
            block_parts=(("double", "self_attn"),))
_LTXV = FamilySpec("LTXV", "dit", (("double", "transformer_blocks"),), patch=(1, 1, 1), nag="cross",
                   cross_attention="attn2", block_parts=(("double", "attn1"),))
FAMILIES: dict[str, FamilySpec] = {
    _ldm("modules.diffusionmodules.openaimodel.UNetModel"): FamilySpec("UNet (SD1.5/SDXL)", "unet", nag="attn2"),
    _ldm("flux.model.Flux"): FamilySpec("Flux", **_FLUX_LIKE),
    _ldm("chroma.model.Chroma"): FamilySpec("Chroma", **_FLUX_LIKE),
    _ldm("chroma_radiance.model.ChromaRadiance"): FamilySpec("Chroma Radiance", **_FLUX_LIKE, patch=(16, 16)),
    _ldm("modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper"): FamilySpec(
        "SD3/SD3.5", "dit", (("double", "joint_blocks"),), joint=True, rope=False, nag="joint",
        block_parts=(("double", "x_block.attn"),)),
    _ldm("aura.mmdit.MMDiT"): FamilySpec(
        "AuraFlow", "dit", (("double", "double_layers"), ("single", "single_layers")), joint=True, rope=False,
        block_parts=(("double", "attn"), ("single", "attn"))),
    _ldm("wan.model.WanModel"): FamilySpec("WAN", **_WAN),
    _ldm("wan.model.VaceWanModel"): FamilySpec("WAN VACE", **_WAN),
    _ldm("wan.model.CameraWanModel"): FamilySpec("WAN camera", **_WAN),
    _ldm("wan.model.HumoWanModel"): FamilySpec("WAN HuMo", **_WAN),
    _ldm("wan.model_animate.AnimateWanModel"): FamilySpec("WAN animate", **_WAN),
    _ldm("wan.model.WanModel_S2V"): FamilySpec("WAN S2V", "dit", (("double", "blocks"),), patch=(1, 2, 2),
                                               transformer_options_in_blocks=False),
    _ldm("hunyuan_video.model.HunyuanVideo"): FamilySpec(
        "HunyuanVideo", "dit", (("double", "double_blocks"), ("single", "single_blocks")), joint=True,
        image_first=True, patch=(1, 2, 2), nag="joint", text_refiner="txt_in", block_parts=_FLUX_PARTS),
    _ldm("qwen_image.model.QwenImageTransformer2DModel"): FamilySpec(
        "Qwen-Image", "dit", (("double", "transformer_blocks"),), joint=True, patch=(1, 2, 2), nag="joint",
        text_pe_token_dim=1, block_parts=(("double", "attn"),)),
    _ldm("lightricks.model.LTXVModel"): _LTXV,
    _ldm("lightricks.model.LTXVImageModel"): _LTXV,  # ComfyUI 0.38: image-only LTXV, the same blocks
}
# Families NAG serves without any block hook (it needs only their cross-attention modules)
NAG_ONLY_FAMILIES: dict[str, FamilySpec] = {
    _ldm("cosmos.predict2.MiniTrainDIT"): FamilySpec("Cosmos Predict2", "dit", (("double", "blocks"),),
                                                     patch=(1, 2, 2), nag="cross", cross_attention="cross_attn"),
}
# Families without any block hook, by class name (any module): the name users know them by
UNSUPPORTED = {
    "NextDiT": "Lumina2", "NextDiTPixelSpace": "Z-Image (pixel space)", "HiDreamImageTransformer2DModel": "HiDream",
    "MiniTrainDIT": "Cosmos Predict2", "GeneralDIT": "Cosmos", "PixArtMS": "PixArt", "HunYuanDiT": "HunyuanDiT",
    "StageC": "Stable Cascade", "StageB": "Stable Cascade", "AsymmDiTJoint": "Mochi", "Kandinsky5": "Kandinsky 5",
    "QwenImage21Transformer2DModel": "Qwen-Image 2.1", "MageFlowTransformer2DModel": "MageFlow",
}
# Subclasses of served classes that newer ComfyUI versions add, with why they cannot be served
REFUSED_SUBCLASSES = {
    "LTXAVModel": ("LTX-2 (audio-video)", "its blocks carry a (video, audio) pair instead of one token tensor and "
                                          "run separate video, audio and cross-modal attention calls"),
    "WanAnimate2Model": ("WAN Animate 2", "with pose latents its self-attention runs one call per latent frame "
                                          "against extra pose tokens"),
    "CausalWanModel": ("WAN causal (autoregressive)", "in autoregressive mode it calls its blocks without ComfyUI's "
                                                      "block patches and transformer_options"),
    "Anima": ("Anima", "its text conditioning is rewritten by an adapter inside the model"),
}
# What works instead where it is narrower than the general alternatives
REFUSED_ALTERNATIVES = {
    "LTXAVModel": "the CFG-space methods (APG, TCFG, CFG-Zero*, FDG, CFG schedules) on LTX-2; the perturbation "
                  "methods work on LTXV (LTX-Video 0.9.x)",
}
ALTERNATIVES = ("TSG, ICG or the CFG-space methods (APG, TCFG, CFG-Zero*, FDG, CFG schedules), which work on every "
                "family (the perturbation methods work on SD1.5/SDXL, Flux, Chroma, SD3, AuraFlow, WAN, HunyuanVideo, "
                "Qwen-Image and LTXV)")


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def exact_spec(table: dict[str, FamilySpec], net) -> FamilySpec | None:
    """The table's entry for the model's own class (never a base class)."""
    return table.get(qualified_name(type(net)))


def served_ancestor(table: dict[str, FamilySpec], net) -> tuple[type, FamilySpec] | None:
    """The nearest base class of the model's class that the table serves (for messages only)."""
    for cls in type(net).__mro__[1:]:
        spec = table.get(qualified_name(cls))
        if spec is not None:
            return cls, spec
    return None


def describe(net) -> str:
    """How messages name a model: the family users know, or its class and module."""
    cls = type(net)
    refused = REFUSED_SUBCLASSES.get(cls.__name__)
    if refused is not None:
        return f"{refused[0]} ({cls.__name__})"
    known = UNSUPPORTED.get(cls.__name__)
    if known is not None:
        return known
    return f"{cls.__name__} (from {cls.__module__})"


def unserved_message(owner: str, net, what: str, table: dict[str, FamilySpec], alternatives: str) -> str:
    """Why ``net`` is not served: an unknown subclass of a served family, or a family without hooks."""
    cls = type(net)
    ancestor = served_ancestor(table, net)
    if ancestor is not None:
        base, spec = ancestor
        refused = REFUSED_SUBCLASSES.get(cls.__name__)
        reason = (f"{refused[1]}" if refused is not None else
                  "its blocks may take other arguments or call attention differently, and it has not been verified")
        alternatives = REFUSED_ALTERNATIVES.get(cls.__name__, alternatives)
        return (f"{owner}: this model is {describe(net)}, a newer subclass of {spec.name}'s {base.__name__} "
                f"(class {qualified_name(cls)}) that Guidance Kit's {what} hooks refuse rather than crash or act on "
                f"the wrong attention: {reason}. Use {alternatives}.")
    return f"{owner}: this model family has no {what} hook we support: {describe(net)}. Use {alternatives}."


def family_of(model_patcher, owner: str) -> FamilySpec:
    """The block-hook family of a model (exact class), else a FamilyError naming it and the alternatives."""
    net = model_patcher.model.diffusion_model
    spec = exact_spec(FAMILIES, net)
    if spec is None:
        raise FamilyError(unserved_message(owner, net, "block", FAMILIES, ALTERNATIVES))
    if not spec.transformer_options_in_blocks:
        raise FamilyError(f"{owner}: {spec.name} blocks do not pass ComfyUI's transformer_options, so no "
                          f"perturbation can be applied per branch. Use {ALTERNATIVES}.")
    return spec


def _child(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _takes_transformer_options(block) -> bool:
    params = inspect.signature(type(block).forward).parameters
    return "transformer_options" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_blocks(net, spec: FamilySpec, owner: str, keys=None) -> None:
    """The block lists and attention modules the hooks rely on exist (``keys``: the DiT blocks used).

    A ComfyUI version that rebuilds a family differently is an error here, at the node, naming the
    family and what is missing, instead of a crash or a silent no-op while sampling.
    """
    if spec.is_unet:
        return  # UNet layers are found by type (SpatialTransformer); checked by the UNet hooks
    report = f"Please report it (ComfyUI {comfyui_version()}); use {ALTERNATIVES}."
    parts = dict(spec.block_parts)
    for group, attr in spec.groups:
        blocks = getattr(net, attr, None)
        if blocks is None or not hasattr(blocks, "__len__") or not hasattr(blocks, "__getitem__"):
            raise FamilyError(f"{owner}: this {spec.name} model ({type(net).__name__}) has no '{attr}' block list; "
                              f"this ComfyUI version builds it differently. {report}")
        wanted = range(len(blocks)) if keys is None else sorted(i for g, i in keys if g == group)
        for index in wanted:
            if index >= len(blocks):
                raise FamilyError(f"{owner}: {spec.name} has {len(blocks)} '{attr}' blocks; block {index} does not "
                                  f"exist.")
            block = blocks[index]
            if group in parts and _child(block, parts[group]) is None:
                raise FamilyError(f"{owner}: {spec.name} block {attr}.{index} ({type(block).__name__}) has no "
                                  f"'{parts[group]}' attention module; this ComfyUI version builds it differently. "
                                  f"{report}")
            if not _takes_transformer_options(block):
                raise FamilyError(f"{owner}: {spec.name} block {attr}.{index} ({type(block).__name__}) takes no "
                                  f"transformer_options, so no branch perturbation can reach its attention. {report}")


def comfyui_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001 - only for messages
        return "unknown version"
