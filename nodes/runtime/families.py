"""The family table: which ComfyUI diffusion models the pack serves, how, and every per-family default.

A family is matched by the diffusion model's **exact** class (module + name), never by a base class: newer
ComfyUI versions subclass served classes for models whose blocks take other arguments (LTX-2's
``LTXAVModel(LTXVModel)`` passes a (video, audio) tuple as ``img``; ``WanAnimate2Model(WanModel)`` splits its
self-attention per frame), so a match through the MRO would install hooks that crash or silently act on the
wrong call at sampling time. An unknown subclass of a served class is refused at the node, with a message
that names its class and module, the family it derives from and what works instead (``family_of``).

``TABLE`` is the one place that knows a family: how its blocks are addressed and its tokens laid out, which
methods serve it (``perturbations``, ``nag``, ``scfg``, ``time_embedding``) and their defaults (the SLG / STG
layers, NAG's scale/τ/α, S-CFG's foreground split, NAG's pooled modulation, TSG's embedding module). What
the ComfyUI ``BaseModel`` class adds (SDXL and SD1.5 share the UNet class) is ``MODEL_VARIANTS``. The support
lists of the error messages are generated from the table (``support_list``). Exact classes, ComfyUI 0.3.64
and 0.38:

==================  ====================================================================================
Family              classes (``comfy.ldm.<module>.<class>``)
==================  ====================================================================================
UNet (SD1.5/SDXL)   modules.diffusionmodules.openaimodel.UNetModel (SD1.x, SD2.x, SDXL, SVD, digits model)
Flux                flux.model.Flux (Flux.1, Kontext; Flux 2 and LongCat-Image reuse it)
Chroma (Radiance)   chroma.model.Chroma, chroma_radiance.model.ChromaRadiance
SD3/SD3.5           modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper (how ComfyUI builds SD3)
AuraFlow            aura.mmdit.MMDiT
WAN                 wan.model.WanModel / VaceWanModel / CameraWanModel / HumoWanModel,
                    wan.model_animate.AnimateWanModel (WanModel_S2V: refused, its blocks get no
                    transformer_options)
HunyuanVideo        hunyuan_video.model.HunyuanVideo (also HunyuanVideo 1.5 and HunyuanImage 2.1)
Qwen-Image          qwen_image.model.QwenImageTransformer2DModel
LTXV                lightricks.model.LTXVModel, lightricks.model.LTXVImageModel (0.38; same block)
Cosmos Predict2     cosmos.predict2.MiniTrainDIT (no block-replace: object patches of its blocks'
                    forward, ``runtime/block_forward.py``)
Lumina2 / Z-Image   lumina.model.NextDiT (no block-replace: object patches of its layers, ``runtime/lumina.py``)
Mochi               genmo.joint_model.asymm_models_joint.AsymmDiTJoint (block methods and TSG; NAG refused)
Cosmos 1            cosmos.model.GeneralDIT (tokens [T, H, W, B, D]: object patches of its blocks' forward that
                    present them batch first, ``runtime/block_forward.py``; NAG refused)
HiDream             hidream.model.HiDreamImageTransformer2DModel (keyword-only block calls: object patches of its
                    blocks' forward, ``runtime/block_forward.py``; NAG refused)
TSG only            PixArt, HunyuanDiT (their time-embedding module; ``refusal``: why)
==================  ====================================================================================
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass


class FamilyError(ValueError):
    """A method asked for on a model family it cannot serve."""


@dataclass(frozen=True)
class NagDefaults:
    """NAG's ``auto`` values for a family (``source``: where they come from)."""

    scale: float
    tau: float
    alpha: float
    source: str


@dataclass(frozen=True)
class PooledSite:
    """How a family turns the pooled text vector into its modulation vector (NAG's negative modulation)."""

    family: str
    embedder: str  # diffusion_model attribute embedding the pooled vector (added to the time embedding)
    width: str = ""  # diffusion_model.params attribute: how many channels of ``y`` the embedder reads ("" = all)
    blocks: str = "flux"  # "flux": Modulation patches; "mmdit": context-block pre/post attention patches


@dataclass(frozen=True)
class TimeEmbeddingSite:
    """Where a family's time-step embedding is computed (TSG): ``path`` below ``diffusion_model``."""

    family: str
    path: str
    tuple_output: bool = False  # the module returns (embedding, other) (Cosmos: (emb, adaLN-LoRA))


@dataclass(frozen=True)
class FamilySpec:
    """One family: how its blocks are addressed, how tokens are laid out in its attention, what serves it."""

    name: str
    kind: str  # "unet" | "dit"
    groups: tuple[tuple[str, str], ...] = ()  # (selection group, diffusion_model attribute) for DiTs
    joint: bool = False  # text tokens share the self-attention call with image tokens
    image_first: bool = False  # joint order: [image, text] instead of [text, image]
    rope: bool = True  # positions applied inside every block (token shuffling needs this)
    patch: tuple[int, ...] = (2, 2)  # (h, w) or (t, h, w) patch size of image tokens
    transformer_options_in_blocks: bool = True
    # "dit": patches_replace["dit"]; "layers": object patches of each layer (Lumina2, runtime/lumina.py); "forward" /
    # "keywords": object patches of each block's forward (Cosmos Predict2 / HiDream, runtime/block_forward.py)
    block_hook: str = "dit"
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
    label: str = ""  # how support lists name it ("" = ``name``)
    perturbations: bool = True  # served by the block/attention perturbations (PAG, SEG, TPG, SLG, S²)
    slg_blocks: tuple[int, int] = (7, 9)  # SLG's auto double blocks (first, last)
    slg_singles: bool = True  # SLG's auto selection adds 'single 7-9' where the model has more than 9
    stg_blocks: tuple[tuple[int, int], ...] = ()  # (double blocks, STG block): PAG's and SLG's auto block (LTXV)
    nag_defaults: NagDefaults | None = None
    nag_pooled: PooledSite | None = None  # the NAG negative's own pooled modulation (Flux, SD3, HunyuanVideo)
    scfg: bool = False  # S-CFG reads its joint (or UNet cross-) attention maps
    scfg_start_token: bool = False  # the text starts with CLIP's [SOT]: S-CFG's official foreground split applies
    time_embedding: TimeEmbeddingSite | None = None  # TSG's paper mode
    time_embedding_refusal: str = ""  # why TSG's paper mode cannot apply (no embedding module of its own)
    refusal: str = ""  # perturbations=False: why the block methods do not serve this family
    nag_refusal: str = ""  # nag="": why NAG does not serve this family

    @property
    def is_unet(self) -> bool:
        return self.kind == "unet"

    @property
    def support_label(self) -> str:
        return self.label or self.name


def _ldm(path: str) -> str:
    return "comfy.ldm." + path


# NAG defaults, verified against the official code (ChenDarYen/Normalized-Attention-Guidance pipelines and
# README, ChenDarYen/ComfyUI-NAG example workflows); families without an official setting use the official
# processors' defaults (τ 2.5, α 0.25) with the scale of the README's Flux/SD3.5 examples.
NAG_OFFICIAL_DIT = NagDefaults(5.0, 2.5, 0.25, "no official setting; the official DiT processors' τ and α, scale 5")
NAG_SD15 = NagDefaults(5.0, 2.5, 0.38, "ComfyUI-NAG SD1.5 workflow (with cfg 7)")
NAG_SDXL = NagDefaults(3.0, 2.5, 0.5, "official README (SDXL DMD2, 4 steps) and SDXL pipeline defaults")
NAG_CHROMA = NagDefaults(5.0, 2.5, 0.25, "ComfyUI-NAG Chroma workflow")
NAG_WAN = NagDefaults(9.0, 2.5, 0.25, "official README (Wan2.1 T2V with cfg 5) and Wan pipeline defaults")

_CHROMA_TIME = ("its distilled approximator maps time, guidance and block index straight to every block's "
                "modulation; there is no time embedding of its own to perturb")
_FLUX_PARTS = (("double", "img_attn"), ("single", "linear1"))
_FLUX_LIKE = dict(kind="dit", groups=(("double", "double_blocks"), ("single", "single_blocks")), joint=True,
                  nag="joint", text_mask="regional", block_parts=_FLUX_PARTS)
_WAN_TIME = TimeEmbeddingSite("WAN", "time_embedding")
_WAN = dict(kind="dit", groups=(("double", "blocks"),), patch=(1, 2, 2), label="WAN 2.1/2.2", slg_blocks=(9, 9),
            slg_singles=False, time_embedding=_WAN_TIME)
_WAN_NAG = dict(_WAN, nag="cross", cross_attention="cross_attn", block_parts=(("double", "self_attn"),),
                nag_defaults=NAG_WAN, scfg=True)
_LTXV = dict(kind="dit", groups=(("double", "transformer_blocks"),), patch=(1, 1, 1), nag="cross", scfg=True,
             cross_attention="attn2", block_parts=(("double", "attn1"),), nag_defaults=NAG_OFFICIAL_DIT,
             # LTX-Video's STG default (Lightricks/LTX-Video configs, stg_mode "attention_values" = PAG's operator):
             # ltxv-2b-0.9*.yaml skip_block_list [19] (28 blocks); ltxv-13b-0.9.8-dev.yaml [28] (48 blocks)
             stg_blocks=((28, 19), (48, 28)))


def _time_only(name: str, path: str, refusal: str, nag_refusal: str = "", tuple_output: bool = False) -> FamilySpec:
    """A family served only by TSG's paper mode (its time-embedding module): no block hooks (``refusal``: why)."""
    return FamilySpec(name, "dit", perturbations=False, time_embedding=TimeEmbeddingSite(name, path, tuple_output),
                      refusal=refusal, nag_refusal=nag_refusal or refusal)


# Lumina2 / NextDiT: NAG's auto values. No official setting (the NAG authors give none for Lumina2 or Z-Image);
# ComfyUI-NAG pull request #64 (Z-Image-Turbo, cfg 1): scale 1.5-2.3, tau 2.5, alpha 0.25, and NAG stopped for the
# last steps (sigma_end 0.7-0.9); scale 3 and above distorts. The middle of that range.
NAG_LUMINA2 = NagDefaults(2.0, 2.5, 0.25, "ComfyUI-NAG pull request #64 (Z-Image-Turbo at cfg 1: scale 1.5-2.3, "
                                          "tau 2.5, alpha 0.25); no official setting")


TABLE: dict[str, FamilySpec] = {
    _ldm("modules.diffusionmodules.openaimodel.UNetModel"): FamilySpec(
        "UNet (SD1.5/SDXL)", "unet", nag="attn2", label="SD1.5/SDXL", nag_defaults=NAG_SD15, scfg=True,
        scfg_start_token=True, time_embedding=TimeEmbeddingSite("UNet (SD1.5/SDXL)", "time_embed")),
    _ldm("flux.model.Flux"): FamilySpec(
        "Flux", **_FLUX_LIKE, nag_defaults=NagDefaults(5.0, 2.5, 0.25, "official README (Flux schnell) and Flux "
                                                                        "processor defaults"),
        nag_pooled=PooledSite("Flux", "vector_in", "vec_in_dim"), scfg=True,
        time_embedding=TimeEmbeddingSite("Flux", "time_in")),
    _ldm("chroma.model.Chroma"): FamilySpec("Chroma", **_FLUX_LIKE, nag_defaults=NAG_CHROMA, scfg=True,
                                            time_embedding_refusal=_CHROMA_TIME),
    _ldm("chroma_radiance.model.ChromaRadiance"): FamilySpec(
        "Chroma Radiance", **_FLUX_LIKE, patch=(16, 16), nag_defaults=NAG_CHROMA, time_embedding_refusal=_CHROMA_TIME),
    _ldm("modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper"): FamilySpec(
        "SD3/SD3.5", "dit", (("double", "joint_blocks"),), joint=True, rope=False, nag="joint",
        block_parts=(("double", "x_block.attn"),), slg_singles=False,  # SLG 7-9: Stability's SD3.5 Medium
        nag_defaults=NagDefaults(5.0, 2.5, 0.125, "official README (SD3.5 Large Turbo) and SD3 pipeline defaults"),
        nag_pooled=PooledSite("SD3/SD3.5", "y_embedder", blocks="mmdit"), scfg=True, scfg_start_token=True,
        time_embedding=TimeEmbeddingSite("SD3/SD3.5", "t_embedder")),
    _ldm("aura.mmdit.MMDiT"): FamilySpec(
        "AuraFlow", "dit", (("double", "double_layers"), ("single", "single_layers")), joint=True, rope=False,
        block_parts=(("double", "attn"), ("single", "attn")), time_embedding=TimeEmbeddingSite("AuraFlow",
                                                                                                "t_embedder")),
    _ldm("wan.model.WanModel"): FamilySpec("WAN", **_WAN_NAG),
    _ldm("wan.model.VaceWanModel"): FamilySpec("WAN VACE", **_WAN_NAG),
    _ldm("wan.model.CameraWanModel"): FamilySpec("WAN camera", **_WAN_NAG),
    _ldm("wan.model.HumoWanModel"): FamilySpec("WAN HuMo", **_WAN_NAG),
    _ldm("wan.model_animate.AnimateWanModel"): FamilySpec("WAN animate", **_WAN_NAG),
    _ldm("wan.model.WanModel_S2V"): FamilySpec("WAN S2V", **_WAN, transformer_options_in_blocks=False,
                                               refusal="its blocks receive no transformer_options, so no "
                                                       "perturbation can be applied per branch"),
    _ldm("hunyuan_video.model.HunyuanVideo"): FamilySpec(
        "HunyuanVideo", "dit", (("double", "double_blocks"), ("single", "single_blocks")), joint=True,
        image_first=True, patch=(1, 2, 2), nag="joint", text_refiner="txt_in", block_parts=_FLUX_PARTS,
        nag_defaults=NagDefaults(9.0, 2.5, 0.12, "ComfyUI-NAG HunyuanVideo workflow"),
        nag_pooled=PooledSite("HunyuanVideo", "vector_in", "vec_in_dim"), scfg=True,
        time_embedding=TimeEmbeddingSite("HunyuanVideo", "time_in")),
    _ldm("qwen_image.model.QwenImageTransformer2DModel"): FamilySpec(
        "Qwen-Image", "dit", (("double", "transformer_blocks"),), joint=True, patch=(1, 2, 2), nag="joint",
        text_pe_token_dim=1, block_parts=(("double", "attn"),), nag_defaults=NAG_OFFICIAL_DIT,
        time_embedding=TimeEmbeddingSite("Qwen-Image", "time_text_embed.timestep_embedder")),
    _ldm("lightricks.model.LTXVModel"): FamilySpec(
        "LTXV", **_LTXV, time_embedding=TimeEmbeddingSite("LTXV", "adaln_single.emb.timestep_embedder")),
    _ldm("lightricks.model.LTXVImageModel"): FamilySpec("LTXV", **_LTXV),  # ComfyUI 0.38: image-only, same blocks
    _ldm("cosmos.predict2.MiniTrainDIT"): FamilySpec(
        "Cosmos Predict2", "dit", (("double", "blocks"),), patch=(1, 2, 2), nag="cross", cross_attention="cross_attn",
        block_hook="forward", block_parts=(("double", "self_attn"),), nag_defaults=NAG_OFFICIAL_DIT,
        time_embedding=TimeEmbeddingSite("Cosmos Predict2", "t_embedder.1", tuple_output=True)),
    _ldm("lumina.model.NextDiT"): FamilySpec(
        "Lumina2", "dit", (("single", "layers"),), joint=True, block_hook="layers", nag="joint",
        block_parts=(("single", "attention"),), label="Lumina2/Z-Image", slg_singles=False, nag_defaults=NAG_LUMINA2,
        scfg=True, time_embedding=TimeEmbeddingSite("Lumina2", "t_embedder")),
    _ldm("hidream.model.HiDreamImageTransformer2DModel"): FamilySpec(
        "HiDream", "dit", (("double", "double_stream_blocks"), ("single", "single_stream_blocks")), joint=True,
        image_first=True, block_hook="keywords", block_parts=(("double", "block.attn1"), ("single", "block.attn1")),
        nag_refusal="its text reaches every block as the T5 tokens plus a fresh Llama 3.1 layer per block "
                    "(encoder_hidden_states_llama3, not the model's context input that NAG extends), so NAG's "
                    "negative tokens would miss the Llama part of every block's text",
        time_embedding=TimeEmbeddingSite("HiDream", "t_embedder")),
    _ldm("pixart.pixartms.PixArtMS"): _time_only(
        "PixArt", "t_embedder", "its blocks receive no transformer_options (no per-branch state can reach their "
                                "attention) and it has no block-replace patch"),
    _ldm("hydit.models.HunYuanDiT"): _time_only(
        "HunyuanDiT", "t_embedder", "its block-replace passes no transformer_options and its blocks take none, so "
                                    "no per-branch state can reach their attention"),
    _ldm("genmo.joint_model.asymm_models_joint.AsymmDiTJoint"): FamilySpec(
        "Mochi", "dit", (("double", "blocks"),), joint=True, image_first=True, patch=(1, 2, 2),
        block_parts=(("double", "attn"),), slg_singles=False,
        nag_refusal="its joint attention keeps only the caption's first num_tokens tokens (crop_y), so appended "
                    "NAG tokens never reach it",
        time_embedding=TimeEmbeddingSite("Mochi", "t_embedder")),
    _ldm("cosmos.model.GeneralDIT"): FamilySpec(
        "Cosmos", "dit", (("double", "blocks"),), patch=(1, 2, 2), block_hook="batch_fourth",
        block_parts=(("double", "blocks.0.block.attn"),), label="Cosmos 1",
        nag_refusal="its self- and cross-attention are one Attention class inside DITBuildingBlocks, told apart only "
                    "by their block_type, and NAG's cross-attention markers are not fitted to them (NAG serves "
                    "Cosmos Predict2)",
        time_embedding=TimeEmbeddingSite("Cosmos", "t_embedder.1", tuple_output=True)),
    _ldm("cascade.stage_c.StageC"): FamilySpec("Stable Cascade", "dit", perturbations=False,
                                               time_embedding_refusal="its time embedding is computed without a "
                                                                      "module (gen_r_embedding)",
                                               refusal="a UNet of its own (ResBlocks with attention) without "
                                                       "ComfyUI's attention patches or transformer_options",
                                               nag_refusal="its text conditioning enters through its own attention "
                                                           "blocks without ComfyUI's attention patches"),
}
TABLE[_ldm("cascade.stage_b.StageB")] = TABLE[_ldm("cascade.stage_c.StageC")]

# the families of the block/attention perturbations, and of NAG (which also serves Cosmos Predict2)
FAMILIES: dict[str, FamilySpec] = {q: s for q, s in TABLE.items() if s.perturbations}
NAG_TABLE: dict[str, FamilySpec] = {q: s for q, s in TABLE.items() if s.perturbations or s.nag}
FAMILIES_BY_NAME: dict[str, FamilySpec] = {s.name: s for s in FAMILIES.values()}
TIME_INPUT = "any model (time input)"  # the family name of the time-input shift (every model)


@dataclass(frozen=True)
class ModelVariant:
    """What the ComfyUI ``BaseModel`` class tells that the diffusion model's class does not."""

    pooled_width: int | None = 0  # ICG: leading channels of the input ``y`` that are the pooled text (None = all)
    nag_defaults: NagDefaults | None = None  # replaces the family's


# by BaseModel class name (matched through the MRO: Chroma's BaseModel derives from Flux's)
MODEL_VARIANTS: tuple[tuple[frozenset[str], ModelVariant], ...] = (
    (frozenset({"SDXL", "SDXLRefiner"}), ModelVariant(pooled_width=1280, nag_defaults=NAG_SDXL)),
    (frozenset({"Flux", "SD3", "HunyuanVideo", "HiDream"}), ModelVariant(pooled_width=None)),
)

# Families without any block hook, by class name (any module): the name users know them by
UNSUPPORTED = {
    "NextDiTPixelSpace": "Z-Image (pixel space)", "HiDreamImageTransformer2DModel": "HiDream",
    "MiniTrainDIT": "Cosmos Predict2", "GeneralDIT": "Cosmos", "PixArtMS": "PixArt", "HunYuanDiT": "HunyuanDiT",
    "StageC": "Stable Cascade", "StageB": "Stable Cascade", "Kandinsky5": "Kandinsky 5",
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
# Families that exist only in newer ComfyUI (read in the newest stored Comfy-Org/ComfyUI, not runnable on the
# test ComfyUI): (family, class, how the pack treats it). "source-checked, not run": the class is one the table
# serves and its blocks take the same arguments; refused ones stop at the node with the family named.
NEWER_ONLY = (
    ("Flux 2", "flux.model.Flux", "served through the Flux row (same class and block-replace arguments; its vec is "
                                  "the precomputed modulation, no pooled vector, so NAG's pooled modulation installs "
                                  "nothing; source-checked, not run); SEG stops on reference-image tokens"),
    ("HunyuanVideo 1.5", "hunyuan_video.model.HunyuanVideo", "served through the HunyuanVideo row (source-checked, not "
                                                             "run; its interface, no pooled vector and ByT5 glyph "
                                                             "tokens, is tested on HunyuanImage 2.1); NAG stops when "
                                                             "ByT5 glyph tokens are present"),
    ("Z-Image / Z-Image-Turbo", "lumina.model.NextDiT", "served through the Lumina2 row: caption and image padding, "
                                                        "block_index/block_type and the attention tensor containers "
                                                        "of newer ComfyUI handled (source-checked, not run)"),
    ("Qwen-Image 2.1", "qwen_image21.model.QwenImage21Transformer2DModel",
     "refused at the node: one stream with block-causal attention run as several calls per block"),
    ("LTX-2", "lightricks.av_model.LTXAVModel", "refused at the node: " + REFUSED_SUBCLASSES["LTXAVModel"][1]),
    ("Kandinsky 5", "Kandinsky5", "refused at the node: its block-replace passes 'x'/'context' instead of "
                                  "ComfyUI's img/txt arguments and its text runs in separate encoder blocks; "
                                  "no tested path matches"),
)
# What works instead where it is narrower than the general alternatives
REFUSED_ALTERNATIVES = {
    "LTXAVModel": "the CFG-space methods (APG, TCFG, CFG-Zero*, FDG, CFG schedules) on LTX-2; the perturbation "
                  "methods work on LTXV (LTX-Video 0.9.x)",
}
# Models whose time input the time-input shift cannot perturb, by class name
TIME_INPUT_REFUSED = {"LTXAVModel": "computes a (video, audio) pair of time inputs"}


def support_list(specs, last: str = " and ") -> str:
    """'A, B and C' of the families' support labels, in table order, each once."""
    labels = list(dict.fromkeys(s.support_label for s in specs))
    return ", ".join(labels[:-1]) + last + labels[-1] if len(labels) > 1 else "".join(labels)


def _check_table() -> None:
    """Every family a method serves has that method's defaults (no silent fallback)."""
    for spec in TABLE.values():
        if spec.nag and spec.nag_defaults is None:
            raise AssertionError(f"family table: {spec.name} serves NAG without NAG defaults")
        if spec.nag == "cross" and not spec.cross_attention:
            raise AssertionError(f"family table: {spec.name} has no cross-attention module name for NAG")


_check_table()

PERTURBATION_FAMILIES = support_list(s for s in FAMILIES.values() if s.transformer_options_in_blocks)
ALTERNATIVES = ("TSG, ICG or the CFG-space methods (APG, TCFG, CFG-Zero*, FDG, CFG schedules), which work on every "
                f"family (the perturbation methods work on {PERTURBATION_FAMILIES})")
NAG_FAMILIES = "; ".join(
    support_list((s for s in NAG_TABLE.values() if s.nag == kind), last=", ") + suffix
    for kind, suffix in (("attn2", ""), ("joint", " (joint attention)"), ("cross", " (cross-attention)")))
SCFG_FAMILIES = support_list(s for s in FAMILIES.values() if s.scfg)


def diffusion_model_of(model_patcher):
    return model_patcher.model.diffusion_model


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
    net = diffusion_model_of(model_patcher)
    spec = exact_spec(FAMILIES, net)
    if spec is None:
        known = exact_spec(TABLE, net)
        if known is not None and known.refusal:
            raise FamilyError(f"{owner}: this model family has no block hook we support: {known.name}. Why: "
                              f"{known.refusal}. Use {ALTERNATIVES}.")
        raise FamilyError(unserved_message(owner, net, "block", FAMILIES, ALTERNATIVES))
    if not spec.transformer_options_in_blocks:
        raise FamilyError(f"{owner}: {spec.name} blocks do not pass ComfyUI's transformer_options, so no "
                          f"perturbation can be applied per branch. Use {ALTERNATIVES}.")
    return spec


def nag_family_of(model_patcher, owner: str) -> FamilySpec:
    """The family NAG patches; a FamilyError naming the family and what to use instead."""
    net = diffusion_model_of(model_patcher)
    spec = exact_spec(NAG_TABLE, net)
    if spec is None or not spec.nag or not spec.transformer_options_in_blocks:
        family = spec.name if spec is not None else describe(net)
        instead = "the sampler's negative prompt with cfg > 1 (and the CFG-space methods)"
        known = exact_spec(TABLE, net)
        if known is not None and known.nag_refusal and not known.nag:
            raise FamilyError(f"{owner}: NAG has no attention hook for {known.name}. Why: {known.nag_refusal}. NAG "
                              f"works on {NAG_FAMILIES}. On {known.name}, use {instead}.")
        if spec is None and served_ancestor(NAG_TABLE, net) is not None:  # a newer subclass (LTX-2, Anima ...)
            raise FamilyError(unserved_message(owner, net, "NAG", NAG_TABLE, f"{instead}; NAG works on {NAG_FAMILIES}"))
        raise FamilyError(f"{owner}: NAG has no attention hook for {family}. NAG works on {NAG_FAMILIES}. On "
                          f"{family}, use {instead}.")
    return spec


def scfg_family_of(model_patcher, owner: str) -> FamilySpec:
    """The family of a model S-CFG can read attention maps from, else a FamilyError."""
    spec = None
    try:
        spec = family_of(model_patcher, owner)
    except FamilyError:
        pass
    if spec is None or not spec.scfg:
        name = spec.name if spec is not None else type(diffusion_model_of(model_patcher)).__name__
        raise FamilyError(f"{owner}: this model family has no cross-attention map hook we support: {name}. S-CFG "
                          f"works on {SCFG_FAMILIES}; on other families use APG, CFG schedules or CFG-Zero* "
                          f"(every family).")
    return spec


def time_input_refusal(model_patcher) -> str | None:
    """Why the time-input shift cannot perturb this model's time input (None: it can)."""
    return TIME_INPUT_REFUSED.get(type(diffusion_model_of(model_patcher)).__name__)


def model_variant(model) -> ModelVariant:
    """The ``MODEL_VARIANTS`` entry of a ComfyUI BaseModel (through its MRO), else the default."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for classes, variant in MODEL_VARIANTS:
        if names & classes:
            return variant
    return ModelVariant()


def nag_defaults(model_patcher, spec: FamilySpec) -> NagDefaults:
    """NAG's ``auto`` values for this model (SD1.5 and SDXL differ inside the UNet family)."""
    return model_variant(model_patcher.model).nag_defaults or spec.nag_defaults


def auto_layers(method: str, spec: FamilySpec, layout) -> str:
    """The family default of a perturbation's ``layers = auto`` (each node's help page cites its source), fitted
    to the model's size. ``method``: the node's label (PAG, SEG, TPG, SLG, S²-Guidance)."""
    if spec.is_unet:
        groups = layout.unet_blocks
        if method == "TPG":
            return tpg_unet_layers(layout)
        if method == "S²-Guidance":
            return "input all, middle all, output all"
        return "middle all" if groups.get("middle") else f"input {max(groups.get('input', {0: 0}))}"
    double = layout.dit_blocks.get("double", 0)
    single = layout.dit_blocks.get("single", 0)
    if method == "S²-Guidance":
        return ", ".join(f"{group} all" for group, count in (("double", double), ("single", single)) if count)
    if spec.stg_blocks and method in ("PAG", "SLG"):
        block = dict(spec.stg_blocks).get(double, 19)
        if block < double:
            return f"double {block}"
    if method == "SLG":
        first, last = spec.slg_blocks  # ComfyUI core SkipLayerGuidanceDiT: double 7, 8, 9 and single 7, 8, 9
        if last < double:
            selection = f"double {first}-{last}" if first != last else f"double {first}"
            if single > 9 and spec.slg_singles:
                selection += ", single 7-9"
            return selection
    if double:
        return f"double {double // 2}"
    return f"single {single // 2}"


# TPG's official SDXL default (TaatiTeam/Token-Perturbation-Guidance, pipeline_sdxl_tpg.py:
# tpg_applied_layers_index = d6 … d23): indices into the UNet's down-path transformer layers, in order
TPG_OFFICIAL_DOWN_LAYERS = range(6, 24)


def tpg_unet_layers(layout) -> str:
    """TPG's UNet default: the official index rule where it applies, else the lowest-resolution input level.

    Official (SDXL): down-path transformer layers d6–d23 = ``input 7.2-9, input 8``. On UNets with fewer
    than 24 down-path layers (SD1.5/SD2: 6, the embedded digits model: 2) the rule selects nothing;
    the pack then takes every input block at the lowest resolution that has attention (SD1.5:
    ``input 7, input 8``; a two-level UNet: its second level only). Shuffling tokens at a full-resolution
    layer is a far stronger perturbation (measured in the TPG help page).
    """
    inputs = layout.unet_blocks.get("input", {})
    if not inputs:
        return "middle all"
    ordered = [(b, t) for b in sorted(inputs) for t in range(inputs[b])]
    if len(ordered) >= TPG_OFFICIAL_DOWN_LAYERS.stop:
        chosen = [ordered[i] for i in TPG_OFFICIAL_DOWN_LAYERS]
        items = []
        for b in sorted({b for b, _ in chosen}):
            layers = sorted(t for bb, t in chosen if bb == b)
            if len(layers) == inputs[b]:
                items.append(f"input {b}")
            else:
                items.append(f"input {b}.{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"input {b}.{layers[0]}")
        return ", ".join(items)
    levels = layout.unet_input_levels
    deepest = max(levels.get(b, 0) for b in inputs)
    return ", ".join(f"input {b}" for b in sorted(inputs) if levels.get(b, 0) == deepest)


def block_name(blocks, index: int) -> str:
    """The attribute name of a family's ``index``-th block (a ModuleDict's keys: Cosmos 1 'block0', ...)."""
    return list(blocks.keys())[index] if hasattr(blocks, "keys") else str(index)


def block_at(blocks, index: int):
    return blocks[block_name(blocks, index)] if hasattr(blocks, "keys") else blocks[index]


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
            block = block_at(blocks, index)
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
