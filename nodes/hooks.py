"""Per-architecture, chunk-selective perturbations for extra guidance branches. The one place that
knows how each model family is built.

The engine runs cond, uncond and every extra branch in one forward; ComfyUI records which chunk of
the batch belongs to which entry of the conds list in ``transformer_options["cond_or_uncond"]``
(also when it splits the batch under memory pressure) and the engine maps entries to branches in
``transformer_options[BRANCH_MAP_KEY]``. Every hook here uses both to act on its branch's rows only,
so cond and uncond rows run the unperturbed model in the same forward.

Hooks by family (no model forward is re-implemented; each hook calls ComfyUI's own block/attention):

* UNet (SD1.5, SDXL, SD2): self-attention through ``patches_replace["attn1"][(group, block, layer)]``;
  block-level operators (skip, token shuffle) through an object patch of the transformer layer's
  ``forward`` attribute (the module tree and weight keys stay unchanged, so LoRAs keep working).
* Block-hook DiTs (Flux, Chroma, SD3/3.5, AuraFlow, WAN 2.1/2.2 incl. VACE/camera/HuMo/animate,
  HunyuanVideo, Qwen-Image, LTXV): ``patches_replace["dit"][(kind, i)]`` wrappers around
  ``original_block`` for block-level operators, plus ``optimized_attention_override`` for attention
  operators inside the selected blocks only.
* Anything else: a clear error at node execution naming the family and what works instead.
"""

from __future__ import annotations

import contextvars
import math
import zlib
from dataclasses import dataclass, field

import torch

from ..guiders import attention_ops
from ..guiders.branch_inputs import independent_embedding, perturbed_timesteps
from ..guiders.layers import BlockLayout
from ..guiders.progress import step_position
from .engine import BRANCH_MAP_KEY

OVERRIDE_KEY = "optimized_attention_override"
BLOCK_CONTEXT_KEY = "guidance_kit_block"
TEXT_LENGTH_KEY = "guidance_kit_text_length"
LATENT_SHAPE_KEY = "guidance_kit_latent_shape"
WRAPPER_KEY = "guidance_kit_hooks"
TIME_WRAPPER_KEY = "guidance_kit_time"
GUARD_WRAPPER_KEY = "guidance_kit_guard"
APPLIED_KEY = "guidance_kit_applied"

ATTENTION_OPERATORS = ("identity_attention", "smoothed_attention")
BLOCK_OPERATORS = ("skip", "token_shuffle", "drop")
ALL_OPERATORS = ATTENTION_OPERATORS + BLOCK_OPERATORS + ("timestep",)


class FamilyError(ValueError):
    """A method asked for on a model family it cannot serve."""


# ------------------------------------------------------------------------------------------------
# model families
# ------------------------------------------------------------------------------------------------

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

    @property
    def is_unet(self) -> bool:
        return self.kind == "unet"


_FLUX_LIKE = dict(kind="dit", groups=(("double", "double_blocks"), ("single", "single_blocks")), joint=True)
FAMILIES: dict[str, FamilySpec] = {
    "UNetModel": FamilySpec("UNet (SD1.5/SDXL)", "unet"),
    "Flux": FamilySpec("Flux", **_FLUX_LIKE),
    "Chroma": FamilySpec("Chroma", **_FLUX_LIKE),
    "ChromaRadiance": FamilySpec("Chroma Radiance", **_FLUX_LIKE, patch=(16, 16)),
    "MMDiT:comfy.ldm.modules.diffusionmodules.mmdit": FamilySpec(
        "SD3/SD3.5", "dit", (("double", "joint_blocks"),), joint=True, rope=False),
    "MMDiT:comfy.ldm.aura.mmdit": FamilySpec(
        "AuraFlow", "dit", (("double", "double_layers"), ("single", "single_layers")), joint=True, rope=False),
    "WanModel": FamilySpec("WAN", "dit", (("double", "blocks"),), patch=(1, 2, 2)),
    "VaceWanModel": FamilySpec("WAN VACE", "dit", (("double", "blocks"),), patch=(1, 2, 2)),
    "CameraWanModel": FamilySpec("WAN camera", "dit", (("double", "blocks"),), patch=(1, 2, 2)),
    "HumoWanModel": FamilySpec("WAN HuMo", "dit", (("double", "blocks"),), patch=(1, 2, 2)),
    "AnimateWanModel": FamilySpec("WAN animate", "dit", (("double", "blocks"),), patch=(1, 2, 2)),
    "WanModel_S2V": FamilySpec("WAN S2V", "dit", (("double", "blocks"),), patch=(1, 2, 2),
                               transformer_options_in_blocks=False),
    "HunyuanVideo": FamilySpec("HunyuanVideo", "dit", (("double", "double_blocks"), ("single", "single_blocks")),
                               joint=True, image_first=True, patch=(1, 2, 2)),
    "QwenImageTransformer2DModel": FamilySpec("Qwen-Image", "dit", (("double", "transformer_blocks"),), joint=True,
                                              patch=(1, 2, 2)),
    "LTXVModel": FamilySpec("LTXV", "dit", (("double", "transformer_blocks"),), patch=(1, 1, 1)),
}
UNSUPPORTED = {
    "NextDiT": "Lumina2", "HiDreamImageTransformer2DModel": "HiDream", "MiniTrainDIT": "Cosmos Predict2",
    "GeneralDIT": "Cosmos", "PixArtMS": "PixArt", "HunYuanDiT": "HunyuanDiT", "StageC": "Stable Cascade",
    "AsymmDiTJoint": "Mochi",
}
FAMILIES_BY_NAME = {spec.name: spec for spec in FAMILIES.values()}
TIME_INPUT_FAMILY = FamilySpec("any model (time input)", "time")
FAMILIES_BY_NAME[TIME_INPUT_FAMILY.name] = TIME_INPUT_FAMILY
ALTERNATIVES = ("the CFG-space methods (APG, TCFG, CFG-Zero*, FDG, schedules) work on every family; "
                "perturbation methods work on SD1.5/SDXL, Flux, Chroma, SD3, AuraFlow, WAN, HunyuanVideo, "
                "Qwen-Image and LTXV")


def diffusion_model_of(model_patcher):
    return model_patcher.model.diffusion_model


def family_of(model_patcher, owner: str) -> FamilySpec:
    net = diffusion_model_of(model_patcher)
    name = type(net).__name__
    spec = None
    for cls in type(net).__mro__:  # e.g. SD3's OpenAISignatureMMDITWrapper is an MMDiT
        spec = FAMILIES.get(f"{cls.__name__}:{cls.__module__}") or FAMILIES.get(cls.__name__)
        if spec is not None:
            break
    if spec is None:
        family = UNSUPPORTED.get(name, name)
        raise FamilyError(f"{owner}: this model family has no block hook we support: {family}. Use {ALTERNATIVES}.")
    if not spec.transformer_options_in_blocks:
        raise FamilyError(f"{owner}: {spec.name} blocks do not pass ComfyUI's transformer_options, so no "
                          f"perturbation can be applied per branch. Use {ALTERNATIVES}.")
    return spec


def family_for_time_input(model_patcher) -> FamilySpec:
    """Time-input perturbations (TSG) need no block hooks: every ComfyUI model computes its time
    input through ``BaseModel.process_timestep``."""
    if not hasattr(model_patcher.model, "process_timestep"):
        raise FamilyError("TSG: this ComfyUI version's model has no process_timestep; update ComfyUI.")
    return TIME_INPUT_FAMILY


def _unet_transformer_layers(block) -> list:
    """The BasicTransformerBlocks inside one UNet block (a TimestepEmbedSequential)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    for layer in block:
        if isinstance(layer, SpatialTransformer):
            return list(layer.transformer_blocks)
    return []


def unet_layers(net) -> dict[tuple[str, int, int], object]:
    """(group, block, layer) → BasicTransformerBlock for every transformer layer of a UNet."""
    out = {}
    for group, blocks in (("input", net.input_blocks), ("middle", [net.middle_block]), ("output", net.output_blocks)):
        for b, block in enumerate(blocks):
            for t, layer in enumerate(_unet_transformer_layers(block)):
                out[(group, b, t)] = layer
    return out


def block_layout(model_patcher, spec: FamilySpec) -> BlockLayout:
    net = diffusion_model_of(model_patcher)
    if spec.is_unet:
        blocks: dict[str, dict[int, int]] = {}
        for group, b, _t in unet_layers(net):
            blocks.setdefault(group, {})
            blocks[group][b] = blocks[group].get(b, 0) + 1
        return BlockLayout(spec.name, unet_blocks=blocks)
    return BlockLayout(spec.name, dit_blocks={group: len(getattr(net, attr)) for group, attr in spec.groups})


# ------------------------------------------------------------------------------------------------
# perturbations (stored in Branch.perturbation; frozen, no tensors)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Perturbation:
    """What a branch changes in the model, where.

    ``operator``: identity_attention (PAG), smoothed_attention (SEG, ``sigma``), token_shuffle (TPG),
    skip (skip-layer guidance), drop (S²-Guidance: ``drop_ratio`` of ``blocks`` resampled every step),
    timestep (TSG: the model's time input shifted by ``timestep_shift``).
    ``blocks``: resolved keys, UNet ``(group, block, layer)`` / DiT ``(group, index)``.
    """

    method: str
    operator: str
    family: str
    blocks: tuple[tuple, ...] = ()
    sigma: float = 0.0
    drop_ratio: float = 0.0
    seed: int = 0
    timestep_shift: float = 0.0

    def acts_on(self, key: tuple, step: int) -> bool:
        if self.operator == "drop":
            return key in dropped_blocks(self, step)
        return key in self.blocks


_DROP_CACHE: dict[tuple, tuple] = {}


def dropped_blocks(p: Perturbation, step: int) -> tuple:
    """The blocks S²-Guidance drops at ``step`` (reproducible: seeded by seed and step)."""
    cache_key = (p.blocks, p.drop_ratio, p.seed, step)
    if cache_key not in _DROP_CACHE:
        chosen = attention_ops.drop_selection(len(p.blocks), p.drop_ratio,
                                              attention_ops.seeded_generator(p.seed, step))
        _DROP_CACHE[cache_key] = tuple(p.blocks[i] for i in chosen)
        if len(_DROP_CACHE) > 4096:
            _DROP_CACHE.clear()
    return _DROP_CACHE[cache_key]


def stable_key(key: tuple) -> int:
    """A process-independent integer for a block key (Python's str hash is salted per process)."""
    return zlib.crc32(repr(key).encode())


def step_of(transformer_options: dict) -> int:
    sigmas = transformer_options.get("sample_sigmas")
    sigma = transformer_options.get("sigmas")
    if sigmas is None or sigma is None:
        return 0
    values = [float(s) for s in sigmas.detach().float().cpu().tolist()]
    return step_position(values, float(torch.as_tensor(sigma).reshape(-1)[0])).step_index


def active(transformer_options: dict, batch_size: int, key: tuple | None, operators: tuple[str, ...]
           ) -> list[tuple[Perturbation, torch.Tensor]]:
    """(perturbation, row indices) for the branches in this forward that act on ``key``."""
    branch_map = transformer_options.get(BRANCH_MAP_KEY)
    chunks = transformer_options.get("cond_or_uncond")
    if not branch_map or not chunks:
        return []
    per_chunk = batch_size // len(chunks)
    if per_chunk * len(chunks) != batch_size:
        raise RuntimeError(f"Guidance Kit: a batch of {batch_size} rows does not split into {len(chunks)} chunks")
    step = None
    rows: dict[Perturbation, list[int]] = {}
    for chunk, index in enumerate(chunks):
        branch = branch_map.get(index)
        p = getattr(branch, "perturbation", None)
        if not isinstance(p, Perturbation) or p.operator not in operators:
            continue
        if key is not None:
            if p.operator == "drop" and step is None:
                step = step_of(transformer_options)
            if not p.acts_on(key, step if step is not None else 0):
                continue
        rows.setdefault(p, []).extend(range(chunk * per_chunk, (chunk + 1) * per_chunk))
    return [(p, torch.tensor(r, dtype=torch.long)) for p, r in rows.items()]


def mark_applied(transformer_options: dict, groups) -> None:
    """Record that these branches' perturbations acted in this forward (see ``perturbation_guard``)."""
    applied = transformer_options.get(APPLIED_KEY)
    if applied is not None:
        applied.update(p for p, _ in groups)


class PerturbationNotApplied(RuntimeError):
    """A branch's perturbation never reached the model: its hook was replaced or bypassed."""


def perturbation_guard(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: every branch perturbation in this forward must act at least once.

    Another node can replace our block/attention patches after ours (they are single slots), and
    a model update can stop calling a hook; the branch would then equal the cond and the method
    would silently do nothing while costing a branch. This turns that into an error.
    """
    transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options")
    if not isinstance(transformer_options, dict):
        return executor(x, t, *args, **kwargs)
    expected = {p for p, _ in active(transformer_options, x.shape[0], None, ALL_OPERATORS)}
    if not expected:
        return executor(x, t, *args, **kwargs)
    applied: set = set()
    transformer_options[APPLIED_KEY] = applied
    try:
        result = executor(x, t, *args, **kwargs)
    finally:
        transformer_options.pop(APPLIED_KEY, None)
    missing = expected - applied
    if missing:
        names = ", ".join(sorted(f"{p.method} ({p.family})" for p in missing))
        raise PerturbationNotApplied(
            f"{names}: the perturbation never reached the model in this step, so the method would do nothing. "
            f"Another node replaced Guidance Kit's block/attention patch (or this ComfyUI version no longer "
            f"calls it). Put the Guidance Kit node after nodes that patch the same blocks or attention, or "
            f"remove one of them.")
    return result


def _take(value, rows: torch.Tensor, batch_size: int):
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch_size:
        return value.index_select(0, rows.to(value.device))
    return value


# ------------------------------------------------------------------------------------------------
# attention override (DiT blocks and custom attention perturbations)
# ------------------------------------------------------------------------------------------------

@dataclass
class BlockContext:
    """Set by a DiT block hook for the duration of one block call."""

    spec: FamilySpec
    key: tuple
    groups: list  # (Perturbation, rows) with attention operators
    image: slice | None  # image tokens inside the joint attention call (None = all tokens)
    grid: tuple[int, ...] | None
    calls: int = 0


def _to_bhld(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return t
    if t.ndim == 4:  # [B, L, H, D]
        return t.transpose(1, 2)
    b, length, hd = t.shape
    return t.view(b, length, heads, hd // heads).transpose(1, 2)


def _from_bhld(t: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    if skip_output_reshape:
        return t
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b, length, h * d)


def _heads_of(args, kwargs) -> int:
    return kwargs["heads"] if "heads" in kwargs else args[3]


def perturbed_attention(p: Perturbation, q, k, v, heads: int, skip_reshape: bool, skip_output_reshape: bool,
                        mask, image: slice | None, grid: tuple[int, ...] | None) -> torch.Tensor:
    """Apply ``p``'s attention operator to rows already selected, in ComfyUI's layouts."""
    qh, kh, vh = (_to_bhld(t, heads, skip_reshape) for t in (q, k, v))
    m = mask
    if m is not None and m.ndim == 2:
        m = m[None, None]
    elif m is not None and m.ndim == 3:
        m = m[:, None]
    if p.operator == "identity_attention":
        out = attention_ops.identity_self_attention(qh, kh, vh, image=image, mask=m)
    elif p.operator == "smoothed_attention":
        if grid is None:
            raise RuntimeError(f"{p.method}: the image token grid is unknown in this block")
        out = attention_ops.smoothed_energy_attention(qh, kh, vh, grid, p.sigma, image=image, mask=m)
    else:
        raise RuntimeError(f"{p.method}: {p.operator} is not an attention operator")
    return _from_bhld(out, skip_output_reshape)


class AttentionDispatcher:
    """``optimized_attention_override`` that routes branch rows to their perturbation.

    Acts (a) inside a DiT block whose hook set a ``BlockContext`` (only on the block's
    self-attention call: the joint call of joint families, the first call elsewhere), and (b) for
    branch perturbations that carry their own ``attention(func, q, k, v, ...)`` callable (applied
    on every attention call of their rows). Chains to the override that was there before.
    """

    is_guidance_kit = True

    def __init__(self, previous=None):
        self.previous = previous

    def _call(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        q = args[0]
        batch_size = q.shape[0]
        groups: list = []
        ctx: BlockContext | None = transformer_options.get(BLOCK_CONTEXT_KEY)
        image = grid = None
        if ctx is not None and ctx.groups:
            ctx.calls += 1
            if ctx.spec.joint:
                image = ctx.image if ctx.calls == 1 else None  # later calls: MMDiT-X image self-attention
                is_self = True
            else:
                is_self = ctx.calls == 1  # WAN / LTXV: self-attention first, then cross-attention
            if is_self:
                groups = [(p, rows) for p, rows in ctx.groups]
                grid = ctx.grid
        custom = _custom_attention_rows(transformer_options, batch_size)
        if not groups and not custom:
            return self._call(func, *args, **kwargs)
        out = None
        taken = torch.zeros(batch_size, dtype=torch.bool)
        heads = _heads_of(args, kwargs)
        skip_reshape = kwargs.get("skip_reshape", False)
        skip_output_reshape = kwargs.get("skip_output_reshape", False)
        mark_applied(transformer_options, groups)
        for p, rows in groups:
            part = perturbed_attention(p, *(_take(a, rows, batch_size) for a in args[:3]), heads, skip_reshape,
                                       skip_output_reshape, _take(kwargs.get("mask"), rows, batch_size), image, grid)
            out = _place(out, part, rows, batch_size)
            taken[rows] = True
        for perturbation, rows in custom:
            rows = rows[~taken[rows]]
            if rows.numel() == 0:
                continue
            part = perturbation.attention(func, *(_take(a, rows, batch_size) for a in args),
                                          **{k: _take(v, rows, batch_size) for k, v in kwargs.items()})
            out = _place(out, part, rows, batch_size)
            taken[rows] = True
        rest = (~taken).nonzero().flatten()
        if rest.numel():
            part = self._call(func, *(_take(a, rest, batch_size) for a in args),
                              **{k: _take(v, rest, batch_size) for k, v in kwargs.items()})
            out = _place(out, part, rest, batch_size)
        return out


def _place(out, part, rows, batch_size):
    if out is None:
        out = part.new_empty((batch_size,) + tuple(part.shape[1:]))
    out[rows.to(out.device)] = part
    return out


def _custom_attention_rows(transformer_options: dict, batch_size: int) -> list:
    branch_map = transformer_options.get(BRANCH_MAP_KEY)
    chunks = transformer_options.get("cond_or_uncond")
    if not branch_map or not chunks:
        return []
    per_chunk = batch_size // len(chunks)
    rows: dict[int, tuple[object, list[int]]] = {}
    for chunk, index in enumerate(chunks):
        p = getattr(branch_map.get(index), "perturbation", None)
        if p is None or isinstance(p, Perturbation) or not hasattr(p, "attention"):
            continue
        rows.setdefault(id(p), (p, []))[1].extend(range(chunk * per_chunk, (chunk + 1) * per_chunk))
    return [(p, torch.tensor(r, dtype=torch.long)) for p, r in rows.values()]


def install_attention_dispatcher(model_patcher) -> None:
    """Make branch attention perturbations reachable on a (cloned) model; idempotent."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    current = to.get(OVERRIDE_KEY)
    if not getattr(current, "is_guidance_kit", False):
        to[OVERRIDE_KEY] = AttentionDispatcher(previous=current)


# ------------------------------------------------------------------------------------------------
# DiT blocks
# ------------------------------------------------------------------------------------------------

def _dit_patch_key(group: str, index: int) -> tuple[str, int]:
    return (f"{group}_block", index)


def image_grid(spec: FamilySpec, latent_shape) -> tuple[int, ...] | None:
    """Token grid of the image tokens: (h, w) or (t, h, w) after patchifying the latent."""
    if latent_shape is None:
        return None
    spatial = list(latent_shape[2:])
    patch = spec.patch[-len(spatial):] if len(spec.patch) >= len(spatial) else (1,) * (len(spatial) - 2) + spec.patch
    grid = tuple(math.ceil(s / p) for s, p in zip(spatial, patch))
    if len(grid) == 3 and grid[0] == 1:
        grid = grid[1:]
    return grid


class DitBlockHook:
    """Our occupant of ``patches_replace["dit"][(kind, i)]``; chains to a previous occupant."""

    is_guidance_kit = True

    def __init__(self, spec: FamilySpec, key: tuple[str, int], previous=None, record_text_length: bool = False):
        self.spec = spec
        self.key = key
        self.previous = previous
        self.record_text_length = record_text_length

    def _run(self, args, extra):
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def _image_span(self, args, to) -> slice | None:
        """Image tokens inside this block's stream ``args["img"]`` (joint single blocks carry text too)."""
        group = self.key[0]
        if not self.spec.joint or group == "double":
            return None
        text = to.get(TEXT_LENGTH_KEY)
        if text is None:
            raise RuntimeError(f"Guidance Kit: the text length of {self.spec.name} single blocks is unknown")
        total = args["img"].shape[1]
        return slice(0, total - text) if self.spec.image_first else slice(text, total)

    def _attention_image(self, args, to) -> slice | None:
        """Image tokens inside the joint attention call."""
        if not self.spec.joint:
            return None
        if self.key[0] == "double":
            text, image = args["txt"].shape[1], args["img"].shape[1]
            return slice(0, image) if self.spec.image_first else slice(text, text + image)
        return self._image_span(args, to)

    def __call__(self, args, extra):
        to = args.get("transformer_options")
        if to is None:
            return self._run(args, extra)
        if self.record_text_length and "txt" in args:
            to[TEXT_LENGTH_KEY] = args["txt"].shape[1]
        batch_size = args["img"].shape[0]
        groups = active(to, batch_size, self.key, ATTENTION_OPERATORS + BLOCK_OPERATORS)
        if not groups:
            return self._run(args, extra)
        mark_applied(to, [(p, rows) for p, rows in groups if p.operator in BLOCK_OPERATORS])
        skip_rows = [rows for p, rows in groups if p.operator in ("skip", "drop")]
        shuffles = [(p, rows) for p, rows in groups if p.operator == "token_shuffle"]
        attention_groups = [(p, rows) for p, rows in groups if p.operator in ATTENTION_OPERATORS]
        args = dict(args)
        if shuffles:
            args, undo = self._shuffle(args, to, shuffles, batch_size)
        else:
            undo = None
        if attention_groups:
            grid = None
            if any(p.operator == "smoothed_attention" for p, _ in attention_groups):
                grid = image_grid(self.spec, to.get(LATENT_SHAPE_KEY))
            local = dict(to)
            local[BLOCK_CONTEXT_KEY] = BlockContext(self.spec, self.key, attention_groups,
                                                    self._attention_image(args, to), grid)
            args["transformer_options"] = local
        if skip_rows:
            out = self._run_without(args, extra, torch.cat(skip_rows), batch_size)
        else:
            out = self._run(args, extra)
        if undo is not None:
            out = undo(out)
        return out

    def _run_without(self, args, extra, skipped: torch.Tensor, batch_size: int) -> dict:
        """Skipped rows return the block's inputs (the block is skipped for them).

        The block still runs on the whole batch: blocks are row-independent, and slicing every
        per-row argument (modulation tuples, masks, rotary tables) differs per family and version.
        """
        kept_inputs = {}  # copied first: some blocks update their inputs in place
        for name in ("img", "txt"):
            value = args.get(name)
            if torch.is_tensor(value):
                kept_inputs[name] = (value.shape, value[skipped.to(value.device)].clone())
        out = dict(self._run(args, extra))
        for name, (shape, original) in kept_inputs.items():
            value = out.get(name)
            if torch.is_tensor(value) and value.shape == shape:
                merged = value.clone()
                merged[skipped.to(merged.device)] = original.to(merged.dtype)
                out[name] = merged
        return out

    def _shuffle(self, args, to, shuffles, batch_size):
        """TPG: permute the image tokens of the branch rows before the block, restore after."""
        img = args["img"]
        span = self._image_span(args, to)
        start = 0 if span is None else span.start
        stop = img.shape[1] if span is None else span.stop
        step = step_of(to)
        index = torch.arange(img.shape[1]).repeat(batch_size, 1)
        for p, rows in shuffles:
            perm = attention_ops.permutation(stop - start,
                                             attention_ops.seeded_generator(p.seed, step, stable_key(self.key)))
            index[rows, start:stop] = start + perm
        gather = index.to(img.device)[..., None].expand(-1, -1, img.shape[-1])
        args["img"] = torch.gather(img, 1, gather)
        inverse = torch.argsort(index, dim=1).to(img.device)

        def undo(out):
            out = dict(out)
            value = out["img"]
            out["img"] = torch.gather(value, 1, inverse[..., None].expand(-1, -1, value.shape[-1]))
            return out

        return args, undo


def latent_shape_wrapper(executor, x, *args, **kwargs):
    """APPLY_MODEL wrapper: publish the latent shape (for token grids) to the blocks of this forward."""
    transformer_options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
    if isinstance(transformer_options, dict):
        transformer_options[LATENT_SHAPE_KEY] = tuple(x.shape)
    return executor(x, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# UNet
# ------------------------------------------------------------------------------------------------

class UNetSelfAttentionHook:
    """Our occupant of ``patches_replace["attn1"][(group, block, layer)]``."""

    is_guidance_kit = True

    def __init__(self, key: tuple[str, int, int], previous=None):
        self.key = key
        self.previous = previous

    def _normal(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra_options["n_heads"],
                                   attn_precision=extra_options.get("attn_precision"),
                                   transformer_options=extra_options)

    def __call__(self, q, k, v, extra_options):
        batch_size = q.shape[0]
        groups = active(extra_options, batch_size, self.key, ATTENTION_OPERATORS)
        if not groups:
            return self._normal(q, k, v, extra_options)
        mark_applied(extra_options, groups)
        heads = extra_options["n_heads"]
        shape = extra_options.get("activations_shape")
        grid = tuple(shape[-2:]) if shape is not None else None
        out = None
        taken = torch.zeros(batch_size, dtype=torch.bool)
        for p, rows in groups:
            part = perturbed_attention(p, q[rows], k[rows], v[rows], heads, False, False, None, None, grid)
            out = _place(out, part, rows, batch_size)
            taken[rows] = True
        rest = (~taken).nonzero().flatten()
        if rest.numel():
            out = _place(out, self._normal(q[rest], k[rest], v[rest], extra_options), rest, batch_size)
        return out


class UNetLayerForward:
    """Object patch of one BasicTransformerBlock's ``forward``: skip or shuffle branch rows.

    Token shuffle on the UNet follows the official TPG pipeline: the branch's tokens are permuted
    before the transformer layer and not restored (the UNet's convolutions then see the shuffled
    layout; restoring would undo the perturbation, since a transformer layer without positional
    encoding is permutation-equivariant).
    """

    def __init__(self, module, key: tuple[str, int, int]):
        self.module = module
        self.key = key

    def _original(self, x, context, transformer_options):
        return type(self.module).forward(self.module, x, context=context, transformer_options=transformer_options)

    def __call__(self, x, context=None, transformer_options=None):
        to = transformer_options if transformer_options is not None else {}
        batch_size = x.shape[0]
        groups = active(to, batch_size, self.key, BLOCK_OPERATORS)
        if not groups:
            return self._original(x, context, to)
        mark_applied(to, groups)
        skipped = [rows for p, rows in groups if p.operator in ("skip", "drop")]
        x_in = x
        for p, rows in groups:
            if p.operator == "token_shuffle":
                perm = attention_ops.permutation(x.shape[1], attention_ops.seeded_generator(
                    p.seed, step_of(to), stable_key(self.key)))
                x = x.clone() if x is x_in else x
                x[rows] = x[rows][:, perm.to(x.device)]
        if not skipped:
            return self._original(x, context, to)
        # the layer runs on every row (rows of other branches still need their own hooks inside it);
        # skipped rows then get their inputs back
        index = torch.cat(skipped).to(x.device)
        kept_inputs = x[index].clone()
        out = self._original(x, context, to).clone()
        out[index] = kept_inputs.to(out.dtype)
        return out


# ------------------------------------------------------------------------------------------------
# ICG: an independent condition for the unconditional branch
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RandomCondition:
    """ICG's independent condition: the prompt's cross-attention context replaced by random tokens
    with the prompt embedding's per-channel statistics (``guiders.branch_inputs``), fixed per seed.

    Conditioning entries without a cross-attention context (e.g. class-label models) are rejected
    with a message; pooled vectors and other model conditions (size, guidance) are kept.
    """

    method: str
    seed: int = 0

    def rewrite_cond(self, cond: dict) -> dict:
        model_conds = cond.get("model_conds")
        cross = model_conds.get("c_crossattn") if isinstance(model_conds, dict) else None
        tensor = getattr(cross, "cond", None)
        if not torch.is_tensor(tensor):
            raise FamilyError(f"{self.method}: this model's conditioning has no cross-attention/text context to "
                              f"replace by an independent one; ICG needs a text- or token-conditioned model.")
        generator = attention_ops.seeded_generator(self.seed, tensor.shape[-2], tensor.shape[-1])
        rewritten = dict(model_conds)
        rewritten["c_crossattn"] = cross._copy_with(independent_embedding(tensor, generator))
        cond["model_conds"] = rewritten
        return cond


# ------------------------------------------------------------------------------------------------
# TSG: a perturbed time input for the branch rows
# ------------------------------------------------------------------------------------------------

_TIME_ROWS: contextvars.ContextVar = contextvars.ContextVar("guidance_kit_time_rows", default=None)


def time_perturbation_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: tell ``ProcessTimestep`` which rows of this forward get a perturbed time."""
    transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
    groups = active(transformer_options or {}, x.shape[0], None, ("timestep",))
    if not groups:
        return executor(x, t, *args, **kwargs)
    token = _TIME_ROWS.set((groups, step_of(transformer_options), executor.class_obj.model_sampling,
                            transformer_options))
    try:
        return executor(x, t, *args, **kwargs)
    finally:
        _TIME_ROWS.reset(token)


class ProcessTimestep:
    """Object patch of the model's ``process_timestep``: perturb the time input of TSG rows.

    ComfyUI's ``BaseModel._apply_model`` computes the model's time input as
    ``process_timestep(model_sampling.timestep(σ))`` just before the network call, so this changes
    the network's time conditioning only: input scaling and the denoised formula keep the true σ.
    """

    def __init__(self, model, previous=None):
        self.model = model
        self.previous = previous

    def __call__(self, timestep, **kwargs):
        if self.previous is not None:
            t = self.previous(timestep, **kwargs)
        else:
            t = type(self.model).process_timestep(self.model, timestep, **kwargs)
        context = _TIME_ROWS.get()
        if context is None or not torch.is_tensor(t) or t.ndim == 0:
            return t
        groups, step, sampling, transformer_options = context
        mark_applied(transformer_options, groups)
        low = float(sampling.timestep(torch.as_tensor(float(sampling.sigma_min))))
        high = float(sampling.timestep(torch.as_tensor(float(sampling.sigma_max))))
        t = t.clone()
        for p, rows in groups:
            rows = rows[rows < t.shape[0]]
            noise = torch.randn(rows.numel(), generator=attention_ops.seeded_generator(p.seed, step))
            t[rows.to(t.device)] = perturbed_timesteps(t[rows.to(t.device)], noise, p.timestep_shift, low, high)
        return t


# ------------------------------------------------------------------------------------------------
# installation
# ------------------------------------------------------------------------------------------------

@dataclass
class Installation:
    """What a perturbation needs installed; ``install`` applies it to a cloned ModelPatcher."""

    spec: FamilySpec
    dit_keys: set = field(default_factory=set)
    record_text_length: bool = False
    unet_attention_keys: set = field(default_factory=set)
    unet_layer_keys: set = field(default_factory=set)
    attention_override: bool = False
    latent_shape: bool = False
    time_input: bool = False


def plan_installation(spec: FamilySpec, layout: BlockLayout, perturbation: Perturbation) -> Installation:
    inst = Installation(spec)
    if perturbation.operator == "timestep":
        inst.time_input = True
        return inst
    attention = perturbation.operator in ATTENTION_OPERATORS
    if spec.is_unet:
        if attention:
            inst.unet_attention_keys.update(perturbation.blocks)
        else:
            inst.unet_layer_keys.update(perturbation.blocks)
        return inst
    inst.dit_keys.update(perturbation.blocks)
    inst.attention_override = attention
    inst.latent_shape = perturbation.operator == "smoothed_attention"
    uses_single = any(k[0] == "single" for k in perturbation.blocks)
    if spec.joint and uses_single and layout.dit_blocks.get("double", 0) > 0:
        inst.record_text_length = True
    return inst


def install(model_patcher, inst: Installation, layout: BlockLayout) -> None:
    import comfy.patcher_extension

    mo = model_patcher.model_options
    to = mo.setdefault("transformer_options", {})
    replace = to.setdefault("patches_replace", {})
    if inst.dit_keys or inst.record_text_length:
        dit = dict(replace.get("dit", {}))
        keys = set(inst.dit_keys)
        recorder = None
        if inst.record_text_length:
            recorder = ("double", layout.dit_blocks["double"] - 1)
            keys.add(recorder)
        for group, index in sorted(keys):
            patch_key = _dit_patch_key(group, index)
            current = dit.get(patch_key)
            record = (group, index) == recorder
            if getattr(current, "is_guidance_kit", False):
                if record and not current.record_text_length:
                    current = DitBlockHook(current.spec, current.key, current.previous, True)
                    dit[patch_key] = current
                continue
            dit[patch_key] = DitBlockHook(inst.spec, (group, index), previous=current, record_text_length=record)
        replace["dit"] = dit
    if inst.unet_attention_keys:
        attn1 = dict(replace.get("attn1", {}))
        for key in inst.unet_attention_keys:
            current = attn1.get(key)
            if not getattr(current, "is_guidance_kit", False):
                attn1[key] = UNetSelfAttentionHook(key, previous=current)
        replace["attn1"] = attn1
    if inst.unet_layer_keys:
        layers = unet_layers(diffusion_model_of(model_patcher))
        for key in inst.unet_layer_keys:
            path = _unet_forward_path(model_patcher, key)
            if not isinstance(model_patcher.object_patches.get(path), UNetLayerForward):
                model_patcher.add_object_patch(path, UNetLayerForward(layers[key], key))
    if inst.attention_override:
        install_attention_dispatcher(model_patcher)
    if not model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, GUARD_WRAPPER_KEY):
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, GUARD_WRAPPER_KEY,
                                           perturbation_guard)
    if inst.time_input:
        current = model_patcher.object_patches.get("process_timestep")
        if not isinstance(current, ProcessTimestep):
            model_patcher.add_object_patch("process_timestep", ProcessTimestep(model_patcher.model, previous=current))
        if not model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TIME_WRAPPER_KEY):
            model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TIME_WRAPPER_KEY,
                                               time_perturbation_wrapper)
    if inst.latent_shape and not model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                                                            WRAPPER_KEY):
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                           latent_shape_wrapper)


def _unet_forward_path(model_patcher, key: tuple[str, int, int]) -> str:
    group, b, t = key
    net = diffusion_model_of(model_patcher)
    from comfy.ldm.modules.attention import SpatialTransformer

    block = net.middle_block if group == "middle" else (net.input_blocks if group == "input" else net.output_blocks)[b]
    prefix = "diffusion_model.middle_block" if group == "middle" else f"diffusion_model.{group}_blocks.{b}"
    for i, layer in enumerate(block):
        if isinstance(layer, SpatialTransformer):
            return f"{prefix}.{i}.transformer_blocks.{t}.forward"
    raise FamilyError(f"no transformer layer at {key}")
