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
* NAG (Normalized Attention Guidance, ``NagInput`` and the hooks it uses): the NAG negative's text
  tokens are appended to the context of the forward, processed by the model's own text layers, and
  kept out of every attention except the extra Z⁻ attention of the prompt's rows: UNet ``attn2``
  replaces; object patches marking the cross-attention modules of WAN, LTXV and Cosmos Predict2;
  the block hooks above for joint attention (Flux, Chroma, SD3, Qwen-Image, HunyuanVideo).
* S-CFG (``install_region_hooks``): reads cross-attention maps for ``guiders.region_guidance``
  — UNet ``attn1``/``attn2`` replaces (self-attention q/k, text keys), the joint attention of the
  last double blocks of Flux/Chroma/SD3 through ``DitBlockHook(regions=True)`` and the dispatcher —
  on the cond (and uncond) rows only, never building an N×N matrix for large layers.
* Anything else: a clear error at node execution naming the family and what works instead.
"""

from __future__ import annotations

import contextvars
import math
import zlib
from dataclasses import dataclass, field

import torch

from ..guiders import attention_ops, region_guidance
from ..guiders.branch_inputs import perturbed_timesteps
from ..guiders.layers import BlockLayout
from ..guiders.progress import sigma_key
from ..guiders.schedules import Window
from .engine import BRANCH_MAP_KEY, REGION_RECORDER_KEY, check_window_reachable, sigma_progress
from .families import (  # noqa: F401  (re-exported: nodes use hooks.FamilySpec, hooks.family_of, ...)
    ALTERNATIVES,
    FAMILIES,
    NAG_ONLY_FAMILIES,
    UNSUPPORTED,
    FamilyError,
    FamilySpec,
    check_blocks,
    exact_spec,
    family_of,
    unserved_message,
)
from .families import describe as describe_family
from .row_delta import (  # noqa: F401  (re-exported: the weight-delta layer patches, nodes/row_delta.py)
    DELTA_LAYERS_KEY,
    DELTA_WRAPPER_KEY,
    DeltaEntry,
    DeltaForward,
    DeltaNotApplied,
    RowDelta,
    delta_bytes,
    delta_layer_classes,
    delta_wrapper,
    install_delta,
    row_groups,
)

OVERRIDE_KEY = "optimized_attention_override"
BLOCK_CONTEXT_KEY = "guidance_kit_block"
TEXT_LENGTH_KEY = "guidance_kit_text_length"
LATENT_SHAPE_KEY = "guidance_kit_latent_shape"
WRAPPER_KEY = "guidance_kit_hooks"
TIME_WRAPPER_KEY = "guidance_kit_time"
GUARD_WRAPPER_KEY = "guidance_kit_guard"
APPLIED_KEY = "guidance_kit_applied"
NOISE_KEY = "guidance_kit_noise_key"  # transformer_options: (sigmas tensor, its sigma_key), per forward
NAG_KEY = "guidance_kit_nag"  # transformer_options: the NagForward of this model call
NAG_WRAPPER_KEY = "guidance_kit_nag"  # APPLY_MODEL wrapper key of NagInput
CROSS_ATTENTION_KEY = "guidance_kit_cross_attention"  # set inside a marked text cross-attention module

ATTENTION_OPERATORS = ("identity_attention", "smoothed_attention")
BLOCK_OPERATORS = ("skip", "token_shuffle", "drop")
ALL_OPERATORS = ATTENTION_OPERATORS + BLOCK_OPERATORS + ("timestep",)


# ------------------------------------------------------------------------------------------------
# model families (nodes/families.py: matched by the diffusion model's exact class)
# ------------------------------------------------------------------------------------------------

FAMILIES_BY_NAME = {spec.name: spec for spec in FAMILIES.values()}
TIME_INPUT_FAMILY = FamilySpec("any model (time input)", "time")
FAMILIES_BY_NAME[TIME_INPUT_FAMILY.name] = TIME_INPUT_FAMILY


def diffusion_model_of(model_patcher):
    return model_patcher.model.diffusion_model


def _spec_in(table: dict[str, FamilySpec], net) -> FamilySpec | None:
    """The table's entry for the model's exact class (SD3 is listed as OpenAISignatureMMDITWrapper, the
    class ComfyUI builds it with); a subclass of a listed class is not matched (``families``)."""
    return exact_spec(table, net)


def family_for_time_input(model_patcher) -> FamilySpec:
    """Time-input perturbations (TSG) need no block hooks: every ComfyUI model computes its time
    input through ``BaseModel.process_timestep``. LTX-2 (``LTXAVModel``) returns a (video, audio) pair
    of time inputs there, which the time shift cannot perturb: refused with the reason."""
    if not hasattr(model_patcher.model, "process_timestep"):
        raise FamilyError("TSG: this ComfyUI version's model has no process_timestep; update ComfyUI.")
    net = diffusion_model_of(model_patcher)
    if type(net).__name__ == "LTXAVModel":
        raise FamilyError(f"TSG: {describe_family(net)} computes a (video, audio) pair of time inputs, which the "
                          f"time-input shift does not perturb. Use the CFG-space methods (APG, TCFG, CFG-Zero*, "
                          f"FDG, CFG schedules) on it.")
    return TIME_INPUT_FAMILY


NAG_FAMILIES = ("SD1.5/SDXL; Flux, Chroma, SD3/SD3.5, Qwen-Image, HunyuanVideo (joint attention); WAN 2.1/2.2, LTXV, "
                "Cosmos Predict2 (cross-attention)")


def nag_family_of(model_patcher, owner: str) -> FamilySpec:
    """The family NAG patches; a FamilyError naming the family and what to use instead."""
    net = diffusion_model_of(model_patcher)
    spec = _spec_in(FAMILIES, net) or _spec_in(NAG_ONLY_FAMILIES, net)
    if spec is None or not spec.nag or not spec.transformer_options_in_blocks:
        family = spec.name if spec is not None else describe_family(net)
        if spec is None and (exact_spec(FAMILIES, net) or exact_spec(NAG_ONLY_FAMILIES, net)) is None:
            served = {**FAMILIES, **NAG_ONLY_FAMILIES}
            from .families import served_ancestor

            if served_ancestor(served, net) is not None:  # a newer subclass of a served class (LTX-2, Anima ...)
                raise FamilyError(unserved_message(owner, net, "NAG", served, f"the sampler's negative prompt with "
                                                   f"cfg > 1 (and the CFG-space methods); NAG works on {NAG_FAMILIES}"))
        raise FamilyError(f"{owner}: NAG has no attention hook for {family}. NAG works on {NAG_FAMILIES}. On "
                          f"{family}, use the sampler's negative prompt with cfg > 1 (and the CFG-space methods).")
    return spec


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


def unet_input_levels(net) -> dict[int, int]:
    """Input block index → resolution level (number of downsampling blocks up to and including it)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

    levels, level = {}, 0
    for b, block in enumerate(net.input_blocks):
        if any(isinstance(layer, Downsample) for layer in block):
            level += 1
        levels[b] = level
    return levels


def block_layout(model_patcher, spec: FamilySpec) -> BlockLayout:
    net = diffusion_model_of(model_patcher)
    if spec.is_unet:
        blocks: dict[str, dict[int, int]] = {}
        for group, b, _t in unet_layers(net):
            blocks.setdefault(group, {})
            blocks[group][b] = blocks[group].get(b, 0) + 1
        return BlockLayout(spec.name, unet_blocks=blocks, unet_input_levels=unet_input_levels(net))
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

    def acts_on(self, key: tuple, noise: int) -> bool:
        if self.operator == "drop":
            return key in dropped_blocks(self, noise)
        return key in self.blocks


_DROP_CACHE: dict[tuple, tuple] = {}


def dropped_blocks(p: Perturbation, noise: int) -> tuple:
    """The blocks S²-Guidance drops at the noise level ``noise`` (``noise_key``): reproducible, seeded by the
    node's seed and σ, so a split run drops the same blocks at the same σ."""
    cache_key = (p.blocks, p.drop_ratio, p.seed, noise)
    dropped = _DROP_CACHE.get(cache_key)  # a memo of a pure function: safe to share between threads
    if dropped is None:
        chosen = attention_ops.drop_selection(len(p.blocks), p.drop_ratio,
                                              attention_ops.seeded_generator(p.seed, noise))
        dropped = tuple(p.blocks[i] for i in chosen)
        if len(_DROP_CACHE) >= 4096:
            _DROP_CACHE.clear()
        _DROP_CACHE[cache_key] = dropped
    return dropped


def stable_key(key: tuple) -> int:
    """A process-independent integer for a block key (Python's str hash is salted per process)."""
    return zlib.crc32(repr(key).encode())


def noise_key(transformer_options: dict) -> int:
    """An integer for this forward's noise level (``guiders.progress.sigma_key``), to seed per-step random draws
    (S²-Guidance's dropped blocks, TPG's permutation, TSG's noise): the same σ draws the same numbers in one
    sampler call and in a run split over several. Computed once per forward (one device sync)."""
    sigma = transformer_options.get("sigmas")
    if sigma is None:
        return 0
    cached = transformer_options.get(NOISE_KEY)
    if cached is not None and cached[0] is sigma:
        return cached[1]
    key = sigma_key(float(torch.as_tensor(sigma).reshape(-1)[0]))
    transformer_options[NOISE_KEY] = (sigma, key)
    return key


def branch_rows(transformer_options: dict, batch_size: int, accept, group=lambda p: p
                ) -> list[tuple[object, torch.Tensor]]:
    """(perturbation, row indices) for the branches of this forward whose perturbation ``accept`` takes.

    The engine records entry index → Branch (``BRANCH_MAP_KEY``), ComfyUI the entry of each batch chunk
    (``cond_or_uncond``); rows of perturbations with the same ``group`` key are gathered together.
    """
    branch_map = transformer_options.get(BRANCH_MAP_KEY)
    chunks = transformer_options.get("cond_or_uncond")
    if not branch_map or not chunks:
        return []
    per_chunk = batch_size // len(chunks)
    if per_chunk * len(chunks) != batch_size:
        raise RuntimeError(f"Guidance Kit: a batch of {batch_size} rows does not split into {len(chunks)} chunks")
    rows: dict = {}
    for chunk, index in enumerate(chunks):
        p = getattr(branch_map.get(index), "perturbation", None)
        if p is None or not accept(p):
            continue
        rows.setdefault(group(p), (p, []))[1].extend(range(chunk * per_chunk, (chunk + 1) * per_chunk))
    return [(p, torch.tensor(r, dtype=torch.long)) for p, r in rows.values()]


def active(transformer_options: dict, batch_size: int, key: tuple | None, operators: tuple[str, ...]
           ) -> list[tuple[Perturbation, torch.Tensor]]:
    """(perturbation, row indices) for the branches in this forward that act on ``key``."""
    step = []  # the step index, computed once and only for block dropping

    def accept(p) -> bool:
        if not isinstance(p, Perturbation) or p.operator not in operators:
            return False
        if key is None:
            return True
        if p.operator == "drop" and not step:
            step.append(noise_key(transformer_options))
        return p.acts_on(key, step[0] if step else 0)

    return branch_rows(transformer_options, batch_size, accept)


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
    nag: JointNagLayout | None = None  # NAG acts on this block's joint attention call
    calls: int = 0
    regions: object | None = None  # S-CFG: the RegionRecorder this block's joint attention feeds
    tokens: int | None = None  # non-joint families: the block's token count (its self-attention's keys)
    covered: int = 0  # non-joint families: self-attention queries seen so far in this block call

    def self_attention_queries(self, args, kwargs) -> slice | None:
        """Non-joint families (WAN, LTXV): the block's query tokens this attention call covers if it is
        (part of) the block's self-attention, else None.

        The self-attention comes first in the block and its keys are the block's tokens. ComfyUI may
        run it as several calls over query slices (newer LTXV with guide strength ≠ 1 or a pixel
        mask: ``_attention_with_guide_mask`` splits the queries into noisy and guide groups, each
        against all keys); the calls are counted until their queries cover the block's tokens, and
        later calls (the text cross-attention) are not self-attention.
        """
        if self.tokens is None or self.covered >= self.tokens:
            return None
        queries, keys = _tokens(args[0], kwargs), _tokens(args[1], kwargs)
        if keys != self.tokens or self.covered + queries > self.tokens:
            methods = ", ".join(sorted({p.method for p, _ in self.groups}))
            raise RuntimeError(
                f"{methods} ({self.spec.name}): block {self.key[1]}'s first attention call has {queries} queries "
                f"against {keys} keys, not the self-attention over the block's {self.tokens} tokens this family "
                f"starts with, so the perturbation would act on the wrong attention. Another node changed this "
                f"block's attention (e.g. an STG option that skips its self-attention), or this ComfyUI version "
                f"calls it differently; remove that node or choose other layers, and please report it.")
        start = self.covered
        self.covered += queries
        return slice(start, start + queries)


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
                        mask, image: slice | None, grid: tuple[int, ...] | None, query: slice | None = None
                        ) -> torch.Tensor:
    """Apply ``p``'s attention operator to rows already selected, in ComfyUI's layouts.

    ``query``: a plain self-attention run as several calls over query slices (newer LTXV with guide
    masks): the slice of the block's tokens this call's queries are. PAG's identity map is exact on a
    slice (each query keeps its own value: ``v[query]``; the guide mask's bias on the diagonal is 0);
    SEG's query blur needs a frame's queries together and refuses.
    """
    qh, kh, vh = (_to_bhld(t, heads, skip_reshape) for t in (q, k, v))
    m = mask
    if m is not None and m.ndim == 2:
        m = m[None, None]
    elif m is not None and m.ndim == 3:
        m = m[:, None]
    partial = query is not None and (query.start != 0 or query.stop != kh.shape[-2])
    if p.operator == "identity_attention":
        if partial:
            out = vh[:, :, query].clone()
        else:
            out = attention_ops.identity_self_attention(qh, kh, vh, image=image, mask=m)
    elif p.operator == "smoothed_attention":
        if partial:
            raise RuntimeError(f"{p.method} ({p.family}): ComfyUI runs this block's self-attention as several calls "
                               f"over query groups (LTXV guides with a strength other than 1 or a pixel mask), and "
                               f"SEG's query blur needs all queries of a frame in one call. Use PAG (it handles the "
                               f"split), or guides at strength 1 without a mask.")
        if grid is None:
            raise RuntimeError(f"{p.method}: the image token grid is unknown in this block")
        length = qh.shape[-2] if image is None else (image.stop - image.start)
        if math.prod(grid) != length:
            raise RuntimeError(f"{p.method} ({p.family}): this block has {length} image tokens but the latent's token "
                               f"grid {tuple(grid)} holds {math.prod(grid)}: the model appended reference or guide "
                               f"tokens (e.g. Flux Kontext / Flux 2 reference images, LTXV keyframe guides, WAN "
                               f"reference frames), and SEG's blur needs the latent's own grid. Use PAG on such a "
                               f"model, or remove the reference inputs.")
        out = attention_ops.smoothed_energy_attention(qh, kh, vh, grid, p.sigma, image=image, mask=m)
    else:
        raise RuntimeError(f"{p.method}: {p.operator} is not an attention operator")
    return _from_bhld(out, skip_output_reshape)


class AttentionDispatcher:
    """``optimized_attention_override`` that routes branch rows to their perturbation and applies NAG.

    Acts (a) inside a DiT block whose hook set a ``BlockContext`` (only on the block's
    self-attention call: the joint call of joint families, the first call elsewhere), (b) for
    branch perturbations that carry their own ``attention(func, q, k, v, ...)`` callable (applied
    on every attention call of their rows), and (c) for NAG on the joint call of a block whose
    context carries a ``JointNagLayout`` and on text cross-attention calls marked by
    ``CrossAttentionForward``. Chains to the override that was there before.
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
        groups: list = []
        ctx: BlockContext | None = transformer_options.get(BLOCK_CONTEXT_KEY)
        image = grid = query = None
        call = 0
        if ctx is not None:
            ctx.calls += 1
            call = ctx.calls
            if ctx.regions is not None and call == 1 and ctx.spec.joint:
                _observe_joint(ctx, args, kwargs)
        if ctx is not None and ctx.groups:
            if ctx.spec.joint:
                image = ctx.image if call == 1 else None  # later calls: MMDiT-X image self-attention
                is_self = True
            else:  # WAN / LTXV: the self-attention first (maybe as query slices), then cross-attention
                query = ctx.self_attention_queries(args, kwargs)
                is_self = query is not None
            if is_self:
                groups = [(p, rows) for p, rows in ctx.groups]
                grid = ctx.grid
        nag: NagForward | None = transformer_options.get(NAG_KEY)
        if nag is not None:
            if ctx is not None and ctx.nag is not None and call == 1:
                return self._joint_with_nag(nag, ctx.nag, func, args, kwargs, groups, grid)
            if transformer_options.get(CROSS_ATTENTION_KEY) and _tokens(args[1], kwargs) == nag.context_tokens:
                return self._cross_with_nag(nag, func, args, kwargs, groups, image, grid)
        return self._dispatch(func, args, kwargs, groups, image, grid, query)

    def _dispatch(self, func, args, kwargs, groups, image, grid, query=None):
        """Perturbed attention for the branch rows in ``groups``, the plain attention for the rest."""
        transformer_options = kwargs.get("transformer_options") or {}
        batch_size = args[0].shape[0]
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
                                       skip_output_reshape, _take(kwargs.get("mask"), rows, batch_size), image, grid,
                                       query)
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

    def _cross_with_nag(self, nag: NagForward, func, args, kwargs, groups, image, grid):
        """Text cross-attention: Z⁺ against the prompt's keys for every row, Z⁻ against the NAG
        negative's keys for the prompt's rows, NAG-combined on those rows."""
        total = _tokens(args[1], kwargs)
        split = total - nag.negative_tokens
        positive_keys = torch.arange(0, split)
        negative_keys = torch.arange(split, total)
        positive_args, positive_kwargs = _attention_view(args, kwargs, None, positive_keys, None, total)
        z_positive = self._dispatch(func, positive_args, positive_kwargs, groups, image, grid)
        negative_args, negative_kwargs = _attention_view(args, kwargs, None, negative_keys, nag.row_subset, total)
        z_negative = self._call(func, *negative_args, **negative_kwargs)
        skip_output_reshape = kwargs.get("skip_output_reshape", False)
        positive_tokens = _token_major(z_positive, skip_output_reshape)
        negative_tokens = _token_major(z_negative, skip_output_reshape)
        if nag.row_subset is None:
            out = nag.combine(positive_tokens, negative_tokens)
        else:
            out = positive_tokens.clone()
            rows = nag.rows.to(out.device)
            out[rows] = nag.combine(positive_tokens[rows], negative_tokens)
        return _from_token_major(out, skip_output_reshape, _heads_of(args, kwargs))

    def _joint_with_nag(self, nag: NagForward, layout: JointNagLayout, func, args, kwargs, groups, grid):
        """Joint attention: every row attends over [prompt text, image] (the model without the NAG
        tokens, perturbations included); the prompt's rows also over [NAG negative text, image],
        which gives the negative text tokens their output and the image tokens Z⁻."""
        total = _tokens(args[0], kwargs)
        if total != layout.total:
            raise RuntimeError(f"{nag.settings.owner}: the joint attention of {layout.block} has {total} tokens, "
                               f"expected {layout.total} (text + image); this model version lays out its tokens "
                               f"differently. Please report it.")
        positive_args, positive_kwargs = _attention_view(args, kwargs, layout.positive_view, layout.positive_view,
                                                         None, total)
        z_positive = self._dispatch(func, positive_args, positive_kwargs, groups, layout.image_in_positive, grid)
        negative_args, negative_kwargs = _attention_view(args, kwargs, layout.negative_view, layout.negative_view,
                                                         nag.row_subset, total)
        z_negative = self._call(func, *negative_args, **negative_kwargs)
        skip_output_reshape = kwargs.get("skip_output_reshape", False)
        positive_tokens = _token_major(z_positive, skip_output_reshape)
        negative_tokens = _token_major(z_negative, skip_output_reshape)
        # rows without NAG give the negative text tokens a zero attention output: those tokens never
        # reach their image tokens, which attend over the prompt's text only
        out = positive_tokens.new_zeros((positive_tokens.shape[0], total, positive_tokens.shape[-1]))
        device = out.device
        out[:, layout.positive_view.to(device)] = positive_tokens
        rows = nag.rows.to(device)[:, None]
        out[rows, layout.negative_text.to(device)[None]] = negative_tokens[:, layout.negative_text_in_negative]
        out[rows, layout.image.to(device)[None]] = nag.combine(positive_tokens[rows[:, 0], layout.image_in_positive],
                                                               negative_tokens[:, layout.image_in_negative])
        return _from_token_major(out, skip_output_reshape, _heads_of(args, kwargs))


def _tokens(t: torch.Tensor, kwargs: dict) -> int:
    """Token count of an attention input in ComfyUI's layouts ([B, L, C], [B, L, H, D] or, with
    ``skip_reshape``, [B, H, L, D])."""
    return t.shape[2] if kwargs.get("skip_reshape", False) else t.shape[1]


def _mask_of(args, kwargs):
    return args[4] if len(args) > 4 else kwargs.get("mask")


def _attention_view(args, kwargs, query_index: torch.Tensor | None, key_index: torch.Tensor,
                    rows: torch.Tensor | None, total: int):
    """(args, kwargs) of an attention call restricted to some rows, queries and keys/values."""
    token_dim = 2 if kwargs.get("skip_reshape", False) else 1
    q, k, v = args[:3]
    batch_size = q.shape[0]
    if rows is not None:
        q, k, v = (t.index_select(0, rows.to(t.device)) for t in (q, k, v))
    if query_index is not None:
        q = q.index_select(token_dim, query_index.to(q.device))
    k = k.index_select(token_dim, key_index.to(k.device))
    v = v.index_select(token_dim, key_index.to(v.device))
    new_args = [q, k, v, *args[3:]]
    new_kwargs = dict(kwargs)
    mask = _mask_of(args, kwargs)
    if torch.is_tensor(mask):
        mask = _mask_view(mask, query_index, key_index, rows, batch_size, total)
        if len(args) > 4:
            new_args[4] = mask
        else:
            new_kwargs["mask"] = mask
    return tuple(new_args), new_kwargs


def _mask_view(mask: torch.Tensor, query_index, key_index, rows, batch_size: int, total: int) -> torch.Tensor:
    """An attention mask ([Lk], [Lq, Lk], [B, Lq, Lk] or [B, H, Lq, Lk]; size-1 dims broadcast)
    restricted like its attention call."""
    if mask.shape[-1] == total:
        mask = mask.index_select(mask.ndim - 1, key_index.to(mask.device))
    elif mask.shape[-1] != 1:
        raise RuntimeError(f"Guidance Kit NAG: an attention mask of shape {tuple(mask.shape)} does not match the "
                           f"{total} keys of its attention call")
    if query_index is not None and mask.ndim >= 2 and mask.shape[-2] == total:
        mask = mask.index_select(mask.ndim - 2, query_index.to(mask.device))
    if rows is not None and mask.ndim >= 3 and mask.shape[0] == batch_size:
        mask = mask.index_select(0, rows.to(mask.device))
    return mask


def _token_major(out: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    """An attention output as [B, L, channels of all heads] (NAG's norms run over a token's channels)."""
    if skip_output_reshape:  # [B, H, L, D]
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    return out


def _from_token_major(out: torch.Tensor, skip_output_reshape: bool, heads: int) -> torch.Tensor:
    if skip_output_reshape:
        return out.reshape(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
    return out


def _place(out, part, rows, batch_size):
    if out is None:
        out = part.new_empty((batch_size,) + tuple(part.shape[1:]))
    out[rows.to(out.device)] = part
    return out


def _custom_attention_rows(transformer_options: dict, batch_size: int) -> list:
    return branch_rows(transformer_options, batch_size,
                       lambda p: not isinstance(p, Perturbation) and hasattr(p, "attention"), group=id)


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
    """Our occupant of ``patches_replace["dit"][(kind, i)]``; chains to a previous occupant.

    ``nag``: this block's joint attention applies NAG when the forward carries a ``NagForward``.
    """

    is_guidance_kit = True

    def __init__(self, spec: FamilySpec, key: tuple[str, int], previous=None, record_text_length: bool = False,
                 nag: bool = False, regions: bool = False):
        self.spec = spec
        self.key = key
        self.previous = previous
        self.record_text_length = record_text_length
        self.nag = nag
        self.regions = regions  # S-CFG reads this block's text→image attention

    def with_options(self, record_text_length: bool | None = None, nag: bool | None = None,
                     regions: bool | None = None) -> DitBlockHook:
        return DitBlockHook(self.spec, self.key, self.previous,
                            self.record_text_length if record_text_length is None else record_text_length,
                            self.nag if nag is None else nag,
                            self.regions if regions is None else regions)

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
        if not torch.is_tensor(args.get("img")):
            if not to.get(BRANCH_MAP_KEY) and to.get(NAG_KEY) is None and to.get(REGION_RECORDER_KEY) is None:
                return self._run(args, extra)
            raise FamilyError(f"Guidance Kit: {self.spec.name} block {self.key[1]} received "
                              f"{type(args.get('img')).__name__} as its tokens instead of one tensor: this model is "
                              f"built differently from {self.spec.name} (e.g. LTX-2's (video, audio) pair), so no "
                              f"block perturbation can act on it. Remove the Guidance Kit perturbation/NAG/S-CFG node "
                              f"from this model; TSG, ICG and the CFG-space methods work on every family.")
        if self.record_text_length and "txt" in args:
            to[TEXT_LENGTH_KEY] = args["txt"].shape[1]
        batch_size = args["img"].shape[0]
        groups = active(to, batch_size, self.key, ATTENTION_OPERATORS + BLOCK_OPERATORS)
        nag: NagForward | None = to.get(NAG_KEY) if self.nag else None
        recorder = to.get(REGION_RECORDER_KEY) if self.regions else None
        if not groups and nag is None and recorder is None:
            return self._run(args, extra)
        mark_applied(to, [(p, rows) for p, rows in groups if p.operator in BLOCK_OPERATORS])
        skip_rows = [rows for p, rows in groups if p.operator in ("skip", "drop")]
        shuffles = [(p, rows) for p, rows in groups if p.operator == "token_shuffle"]
        attention_groups = [(p, rows) for p, rows in groups if p.operator in ATTENTION_OPERATORS]
        if attention_groups and not self.spec.joint:
            self._check_self_attention(args, to, attention_groups)
        args = dict(args)
        nag_layout = None
        if nag is not None:
            nag_layout = self._nag_layout(args, to, nag)
            self._align_negative_positions(args, nag, nag_layout)
        if shuffles:
            args, undo = self._shuffle(args, to, shuffles, batch_size)
        else:
            undo = None
        if attention_groups or nag_layout is not None or recorder is not None:
            grid = None
            if recorder is not None or any(p.operator == "smoothed_attention" for p, _ in attention_groups):
                grid = image_grid(self.spec, to.get(LATENT_SHAPE_KEY))
            local = dict(to)
            local[BLOCK_CONTEXT_KEY] = BlockContext(self.spec, self.key, attention_groups,
                                                    self._attention_image(args, to), grid, nag=nag_layout,
                                                    regions=recorder,
                                                    tokens=None if self.spec.joint else args["img"].shape[1])
            args["transformer_options"] = local
        if skip_rows:
            out = self._run_without(args, extra, torch.cat(skip_rows), batch_size)
        else:
            out = self._run(args, extra)
        if undo is not None:
            out = undo(out)
        return out

    def _check_self_attention(self, args, to, attention_groups) -> None:
        """Attention operators on a non-joint block (WAN, LTXV): its self-attention must run as ours to
        perturb. Newer ComfyUI's LTXV can skip a block's self-attention for every row (the STG option
        ``stg_self_attn_blocks``: out = V, PAG's own operator on all rows, so the branch would equal the
        cond) or split it into query groups (guide masks: PAG handles that, SEG cannot)."""
        methods = ", ".join(sorted({p.method for p, _ in attention_groups}))
        if to.get("stg_skip_self_attn"):
            raise FamilyError(f"{methods} ({self.spec.name}): block {self.key[1]}'s self-attention is already "
                              f"replaced by its values on every row (ComfyUI's LTXV STG option "
                              f"'stg_self_attn_blocks', set by another node), so the branch would equal the "
                              f"conditional prediction. Remove that STG node or choose other layers.")
        if args.get("self_attention_mask") is not None and any(p.operator == "smoothed_attention"
                                                                for p, _ in attention_groups):
            raise FamilyError(f"SEG ({self.spec.name}): this LTXV call carries a guide attention mask (guides with a "
                              f"strength other than 1 or a pixel mask), so ComfyUI splits block {self.key[1]}'s "
                              f"self-attention into query groups, and SEG's query blur needs all queries of a frame in "
                              f"one call. Use PAG (it handles the split), or guides at strength 1 without a mask.")

    def _nag_layout(self, args, to, nag: NagForward) -> JointNagLayout:
        """Where the prompt's text, the NAG negative's text and the image tokens sit in this block's
        joint attention call (the negative's tokens are the last of the text stream)."""
        if self.key[0] == "double":
            text, image = args["txt"].shape[1], args["img"].shape[1]
        else:
            text = to.get(TEXT_LENGTH_KEY)
            if text is None:
                raise RuntimeError(f"{nag.settings.owner}: the text length of {self.spec.name} single blocks is "
                                   f"unknown (the last double block's hook did not run)")
            image = args["img"].shape[1] - text
        return nag.joint_layout(self.key, text, image, self.spec.image_first)

    def _align_negative_positions(self, args, nag: NagForward, layout: JointNagLayout) -> None:
        """Give the NAG negative's text tokens the rotary positions of a prompt of their own.

        Families whose text tokens carry distinct positions (Qwen-Image) number the appended tokens
        after the prompt's; the negative must see the image from the positions it would have alone.
        """
        dim = self.spec.text_pe_token_dim
        pe = args.get("pe")
        if dim is None or not torch.is_tensor(pe):
            return
        cached = nag.aligned_positions.get(id(pe))
        if cached is None or cached[0] is not pe:
            aligned = pe.clone()
            count = nag.negative_tokens
            aligned.narrow(dim, layout.negative_text_start, count).copy_(pe.narrow(dim, layout.prompt_text_start,
                                                                                   count))
            cached = (pe, aligned)
            nag.aligned_positions[id(pe)] = cached
        args["pe"] = cached[1]

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
        step = noise_key(to)
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
        return _unet_attention(self.previous, q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        batch_size = q.shape[0]
        _observe_unet_self(self.key, q, k, extra_options)
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


def _unet_attention(previous, q, k, v, extra_options):
    """The attention a UNet attn1/attn2 replace stands for: the previous occupant's, else ComfyUI's."""
    if previous is not None:
        return previous(q, k, v, extra_options)
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


class UNetCrossAttentionHook:
    """Our occupant of ``patches_replace["attn2"][(group, block, layer)]``: NAG on the prompt's rows,
    and S-CFG's map reading (the prompt's text keys only, never the NAG negative's).

    With NAG in the forward, k/v hold the prompt's context followed by the NAG negative's tokens:
    every row attends over the prompt's tokens (Z⁺, the unmodified cross-attention), the prompt's
    rows also over the negative's (Z⁻), and those rows get ``nag_combine(Z⁺, Z⁻)``. A previous
    occupant (e.g. IP-Adapter's attn2 replace) computes both.
    """

    is_guidance_kit = True

    def __init__(self, key: tuple[str, int, int], previous=None):
        self.key = key
        self.previous = previous

    def __call__(self, q, k, v, extra_options):
        nag: NagForward | None = extra_options.get(NAG_KEY)
        _observe_unet_cross(self.key, q, k[:, :k.shape[1] - nag.negative_tokens] if nag is not None else k,
                            extra_options)
        if nag is None:
            return _unet_attention(self.previous, q, k, v, extra_options)
        split = k.shape[1] - nag.negative_tokens
        z_positive = _unet_attention(self.previous, q, k[:, :split].contiguous(), v[:, :split].contiguous(),
                                     extra_options)
        rows = nag.row_subset
        if rows is None:
            z_negative = _unet_attention(self.previous, q, k[:, split:].contiguous(), v[:, split:].contiguous(),
                                         extra_options)
            return nag.combine(z_positive, z_negative)
        rows = rows.to(q.device)
        z_negative = _unet_attention(self.previous, q[rows], k[rows, split:], v[rows, split:], extra_options)
        out = z_positive.clone()
        out[rows] = nag.combine(z_positive[rows], z_negative)
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
                    p.seed, noise_key(to), stable_key(self.key)))
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
# TSG, legacy mode: a perturbed time input for the branch rows. TSG's paper mode (the time embedding)
# is nodes/time_embedding.py, ICG's independent condition nodes/independent_condition.py.
# ------------------------------------------------------------------------------------------------

_TIME_ROWS: contextvars.ContextVar = contextvars.ContextVar("guidance_kit_time_rows", default=None)


def time_perturbation_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: tell ``ProcessTimestep`` which rows of this forward get a perturbed time."""
    transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
    groups = active(transformer_options or {}, x.shape[0], None, ("timestep",))
    if not groups:
        return executor(x, t, *args, **kwargs)
    token = _TIME_ROWS.set((groups, noise_key(transformer_options), executor.class_obj.model_sampling,
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
            noise = torch.randn(1, generator=attention_ops.seeded_generator(p.seed, step)).expand(rows.numel())
            t[rows.to(t.device)] = perturbed_timesteps(t[rows.to(t.device)], noise, p.timestep_shift, low, high)
        return t


# ------------------------------------------------------------------------------------------------
# NAG: the NAG negative's text as extra context tokens, attention split per prompt
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class NagSettings:
    """One NAG node's settings and its negative text encoding (held by its ``NagInput`` wrapper).

    ``context`` is the NAG negative CONDITIONING's token tensor [batch, tokens, channels] in the
    model's conditioning space (``c_crossattn``); ``mask`` its per-token attention mask, when the
    text encoder gives one. ``modulation``: on DiTs whose block modulation carries the pooled text
    vector (Flux, SD3, HunyuanVideo), the helper that modulates the negative's text tokens with the
    negative's own pooled vector (``nodes/nag_modulation.py``); None elsewhere.
    """

    owner: str
    spec: FamilySpec
    scale: float
    tau: float
    alpha: float
    window: Window
    context: torch.Tensor
    mask: torch.Tensor | None = None
    modulation: object | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 or self.alpha == 0.0


@dataclass(frozen=True)
class JointNagLayout:
    """Token indices of one joint attention call with NAG: the prompt's view ``[prefix, prompt
    text, image]``, the NAG negative's view ``[prefix, negative text, image]`` (both in call order;
    ``prefix`` = tokens a model puts before the prompt, e.g. registers) and where image and
    negative text sit inside them."""

    block: tuple
    total: int
    positive_view: torch.Tensor
    negative_view: torch.Tensor
    image: torch.Tensor
    negative_text: torch.Tensor
    image_in_positive: slice
    image_in_negative: slice
    negative_text_in_negative: slice
    prompt_text_start: int
    negative_text_start: int


@dataclass(eq=False)
class NagForward:
    """NAG inside one model call (``transformer_options[NAG_KEY]``, set by ``NagInput``)."""

    settings: NagSettings
    rows: torch.Tensor  # the rows of the prompt's chunks (cond_or_uncond index 0): they get NAG
    batch_size: int
    positive_tokens: int  # context tokens of the call before the negative's were appended
    negative_tokens: int
    applied: int = 0
    aligned_positions: dict = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)
    modulation: object | None = None  # nag_modulation.NegativeModulation of this call (own pooled vector)
    current: JointNagLayout | None = None  # the layout of the joint block running now

    @property
    def context_tokens(self) -> int:
        return self.positive_tokens + self.negative_tokens

    @property
    def row_subset(self) -> torch.Tensor | None:
        """The NAG rows, or None when they are the whole batch (cfg 1): no row copies needed."""
        return None if self.rows.numel() == self.batch_size else self.rows

    def combine(self, z_positive: torch.Tensor, z_negative: torch.Tensor) -> torch.Tensor:
        self.applied += 1
        s = self.settings
        return attention_ops.nag_combine(z_positive, z_negative, s.scale, s.tau, s.alpha)

    def joint_layout(self, block: tuple, text: int, image: int, image_first: bool) -> JointNagLayout:
        cache_key = (block[0], text, image)
        if cache_key not in self.layouts:
            self.layouts[cache_key] = self._joint_layout(block, text, image, image_first)
        self.current = self.layouts[cache_key]
        return self.current

    def _joint_layout(self, block: tuple, text: int, image: int, image_first: bool) -> JointNagLayout:
        prefix = text - self.negative_tokens - self.positive_tokens
        if prefix < 0:
            raise RuntimeError(f"{self.settings.owner}: {self.settings.spec.name} block {block} carries {text} text "
                               f"tokens, fewer than the prompt's and the NAG negative's together "
                               f"({self.positive_tokens} + {self.negative_tokens}); this model version changes the "
                               f"text length. Please report it.")
        text_start = image if image_first else 0
        image_start = 0 if image_first else text
        negative_start = text_start + text - self.negative_tokens
        prompt_text = torch.arange(text_start, negative_start)
        prefix_tokens = torch.arange(text_start, text_start + prefix)
        negative_text = torch.arange(negative_start, text_start + text)
        image_tokens = torch.arange(image_start, image_start + image)
        positive_view = torch.cat([prompt_text, image_tokens]).sort().values
        negative_view = torch.cat([prefix_tokens, negative_text, image_tokens]).sort().values
        negative_text_offset = (image if image_first else 0) + prefix
        return JointNagLayout(
            block=block, total=text + image, positive_view=positive_view, negative_view=negative_view,
            image=image_tokens, negative_text=negative_text,
            image_in_positive=slice(0, image) if image_first else slice(text - self.negative_tokens,
                                                                         text - self.negative_tokens + image),
            image_in_negative=slice(0, image) if image_first else slice(prefix + self.negative_tokens,
                                                                         prefix + self.negative_tokens + image),
            negative_text_in_negative=slice(negative_text_offset, negative_text_offset + self.negative_tokens),
            prompt_text_start=text_start + prefix, negative_text_start=negative_start)


class NagNotApplied(RuntimeError):
    """NAG's negative tokens were added but no NAG attention ran: its hooks were replaced or bypassed."""


_NAG_CURRENT: contextvars.ContextVar = contextvars.ContextVar("guidance_kit_nag_forward", default=None)


def current_nag() -> NagForward | None:
    """The NagForward of the model call running now (for patches that see no transformer_options)."""
    return _NAG_CURRENT.get()


def prompt_rows(transformer_options: dict, batch_size: int) -> torch.Tensor | None:
    """Batch rows of the chunks that carry the positive prompt (``cond_or_uncond`` index 0)."""
    chunks = transformer_options.get("cond_or_uncond")
    if not chunks:
        return None
    per_chunk = batch_size // len(chunks)
    if per_chunk * len(chunks) != batch_size:
        raise RuntimeError(f"Guidance Kit: a batch of {batch_size} rows does not split into {len(chunks)} chunks")
    rows = [row for chunk, index in enumerate(chunks) if index == 0
            for row in range(chunk * per_chunk, (chunk + 1) * per_chunk)]
    return torch.tensor(rows, dtype=torch.long) if rows else None


class NagInput:
    """APPLY_MODEL wrapper of the NAG node: the NAG negative's text enters the same forward.

    In a model call that contains the prompt's rows, inside the node's window, the negative's text
    tokens are appended to the context (``c_crossattn``) of **every** row (the batch must stay one
    tensor), so the model's own text layers process them like prompt tokens (HunyuanVideo's text
    refiner runs once per prompt, ``TextRefinerPerPrompt``); a per-token text mask is extended with the
    negative's. The attention hooks keep the negative tokens out of every attention except Z⁻ of the
    prompt's rows, so every other row, and the prompt's rows apart from NAG, compute exactly what they
    would without them. The uncond rows of CFG get no NAG (as the official implementation). A call
    where NAG never reached an attention is an error (``NagNotApplied``).
    """

    def __init__(self, settings: NagSettings):
        self.settings = settings
        self._checked = None  # the sample_sigmas whose window reach was checked

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        to = transformer_options
        rows = None
        if isinstance(to, dict) and not self.settings.is_identity:
            rows = prompt_rows(to, x.shape[0])
        if rows is None or not self._in_window(to, executor.class_obj):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        owner, spec = self.settings.owner, self.settings.spec
        if not torch.is_tensor(c_crossattn) or c_crossattn.ndim != 3:
            raise FamilyError(f"{owner}: this {spec.name} call has no text context tokens to add the NAG negative to.")
        if kwargs.get("txt_byt5") is not None:
            raise FamilyError(f"{owner}: HunyuanImage 2.1's ByT5 glyph tokens follow the text tokens, which NAG does "
                              f"not handle; use the negative prompt with cfg > 1 on this model.")
        chunks = len(to["cond_or_uncond"])
        negative = self._negative_context(c_crossattn, x.shape[0], chunks)
        kwargs = self._with_text_mask(kwargs, c_crossattn.shape[1], negative.shape[1], x.shape[0], chunks)
        nag = NagForward(self.settings, rows, x.shape[0], c_crossattn.shape[1], negative.shape[1])
        if self.settings.modulation is not None:
            nag.modulation = self.settings.modulation.prepare(executor.class_obj, x, kwargs, nag, x.shape[0] // chunks)
        to[NAG_KEY] = nag
        token = _NAG_CURRENT.set(nag)
        try:
            out = executor(x, t, c_concat, torch.cat([c_crossattn, negative], dim=1), control, transformer_options,
                           **kwargs)
        finally:
            _NAG_CURRENT.reset(token)
            to.pop(NAG_KEY, None)
        if nag.modulation is not None and nag.modulation.applied + nag.modulation.skipped == 0:
            raise NagNotApplied(f"{owner}: the NAG negative's own modulation never reached a {spec.name} block in "
                                f"this model call. Another node replaced Guidance Kit's modulation patches after the "
                                f"NAG node; put the NAG node after it, or remove one of them.")
        if nag.applied == 0:
            raise NagNotApplied(
                f"{owner}: the NAG attention never ran in this model call ({spec.name}), so NAG would do nothing. "
                f"Another node replaced Guidance Kit's attention or block patches after the NAG node (or this "
                f"ComfyUI version no longer calls them). Put the NAG node after nodes that patch the same attention "
                f"or blocks, or remove one of them.")
        return out

    def _in_window(self, to: dict, model) -> bool:
        window = self.settings.window
        if window.is_full:
            return True
        sigma = float(torch.as_tensor(to.get("sigmas")).reshape(-1)[0])
        if window.contains(sigma_progress(model.model_sampling, sigma), sigma):
            return True
        sample_sigmas = to.get("sample_sigmas")
        if sample_sigmas is not None and (self._checked is None or self._checked is not sample_sigmas):
            self._checked = sample_sigmas  # once per sampler call
            sigmas = [float(s) for s in sample_sigmas.detach().float().cpu().tolist()]
            try:
                check_window_reachable(self.settings.owner, window, sigmas, model.model_sampling)
            except RuntimeError as e:
                raise FamilyError(str(e)) from None
        return False

    def _negative_context(self, context: torch.Tensor, batch_size: int, chunks: int) -> torch.Tensor:
        import comfy.utils

        negative = self.settings.context
        if negative.shape[-1] != context.shape[-1]:
            raise FamilyError(f"{self.settings.owner}: the NAG negative has {negative.shape[-1]} channels per token, "
                              f"the prompt {context.shape[-1]}. Encode the NAG negative with the same text encoder "
                              f"(CLIP loader) as the prompt.")
        negative = comfy.utils.repeat_to_batch_size(negative, batch_size // chunks).repeat(chunks, 1, 1)
        return negative.to(device=context.device, dtype=context.dtype)

    def _with_text_mask(self, kwargs: dict, positive_tokens: int, negative_tokens: int, batch_size: int,
                        chunks: int) -> dict:
        import comfy.utils

        mask = kwargs.get("attention_mask")
        if mask is None:
            return kwargs
        owner, spec = self.settings.owner, self.settings.spec
        if spec.text_mask != "padding":
            raise FamilyError(f"{owner}: {spec.name} conditioning with an attention mask (regional prompting) "
                              f"cannot be combined with NAG; remove the mask or the NAG node.")
        if not (torch.is_tensor(mask) and mask.ndim == 2 and mask.shape[1] == positive_tokens):
            raise FamilyError(f"{owner}: the prompt's attention mask {tuple(getattr(mask, 'shape', ()))} is not one "
                              f"entry per text token ({positive_tokens}); NAG cannot extend it.")
        negative = self.settings.mask
        if negative is None:
            negative = torch.ones(1, negative_tokens, dtype=mask.dtype)
        negative = comfy.utils.repeat_to_batch_size(negative, batch_size // chunks).repeat(chunks, 1)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.cat([mask, negative.to(device=mask.device, dtype=mask.dtype)], dim=1)
        return kwargs


class CrossAttentionForward:
    """Object patch of a text cross-attention module's ``forward`` (WAN, LTXV, Cosmos Predict2).

    In a NAG forward it marks the module's attention calls (``CROSS_ATTENTION_KEY``) so the
    attention override applies NAG to the call whose keys are the text tokens; the module's own
    forward runs unchanged. Outside NAG forwards it only calls that forward.
    """

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        to = kwargs.get("transformer_options")
        if isinstance(to, dict) and NAG_KEY in to:
            kwargs["transformer_options"] = {**to, CROSS_ATTENTION_KEY: True}
        return type(self.module).forward(self.module, *args, **kwargs)


class TextRefinerPerPrompt:
    """Object patch of HunyuanVideo's text refiner ``txt_in.forward``.

    The refiner mixes the text tokens of a row (self-attention, a mean-pooled conditioning), so in
    a NAG forward the prompt's tokens and the NAG negative's are refined by two calls of the
    refiner's own forward, each exactly as it would run for that text alone.
    """

    def __init__(self, module):
        self.module = module

    def __call__(self, x, timesteps, mask=None, transformer_options=None, **kwargs):
        forward = type(self.module).forward
        options = transformer_options if transformer_options is not None else {}
        nag: NagForward | None = options.get(NAG_KEY) if isinstance(options, dict) else None
        if nag is None:
            return forward(self.module, x, timesteps, mask, transformer_options=options, **kwargs)
        split = x.shape[1] - nag.negative_tokens
        parts = []
        for tokens in (slice(0, split), slice(split, x.shape[1])):
            part_mask = mask[:, tokens] if torch.is_tensor(mask) else mask
            parts.append(forward(self.module, x[:, tokens], timesteps, part_mask, transformer_options=options,
                                 **kwargs))
        return torch.cat(parts, dim=1)


def install_nag(model_patcher, spec: FamilySpec, settings: NagSettings) -> None:
    """Install NAG on a cloned ModelPatcher: its input wrapper and the family's attention hooks."""
    import comfy.patcher_extension

    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if model_patcher.get_wrappers(apply_model, NAG_WRAPPER_KEY):
        raise FamilyError(f"{settings.owner}: this model already has NAG (from an earlier node in the chain). Use one "
                          f"NAG node; to change its settings, edit that node.")
    net = diffusion_model_of(model_patcher)
    replace = model_patcher.model_options.setdefault("transformer_options", {}).setdefault("patches_replace", {})
    if spec.nag == "attn2":
        attn2 = dict(replace.get("attn2", {}))
        for key in unet_layers(net):
            current = attn2.get(key)
            if not isinstance(current, UNetCrossAttentionHook):
                attn2[key] = UNetCrossAttentionHook(key, previous=current)
        if not attn2:
            raise FamilyError(f"{settings.owner}: this UNet has no transformer layers with cross-attention.")
        replace["attn2"] = attn2
    elif spec.nag == "joint":
        layout = block_layout(model_patcher, spec)
        dit = dict(replace.get("dit", {}))
        doubles = layout.dit_blocks.get("double", 0)
        recorder = ("double", doubles - 1) if layout.dit_blocks.get("single", 0) and doubles else None
        for group, _attr in spec.groups:
            for index in range(layout.dit_blocks.get(group, 0)):
                patch_key = _dit_patch_key(group, index)
                current = dit.get(patch_key)
                record = (group, index) == recorder
                if getattr(current, "is_guidance_kit", False):
                    dit[patch_key] = current.with_options(record_text_length=current.record_text_length or record,
                                                          nag=True)
                else:
                    dit[patch_key] = DitBlockHook(spec, (group, index), previous=current, record_text_length=record,
                                                  nag=True)
        replace["dit"] = dit
        install_attention_dispatcher(model_patcher)
        if spec.text_refiner:
            path = f"diffusion_model.{spec.text_refiner}.forward"
            model_patcher.add_object_patch(path, TextRefinerPerPrompt(getattr(net, spec.text_refiner)))
    elif spec.nag == "cross":
        found = 0
        for name, module in net.named_modules():
            if name.rsplit(".", 1)[-1] == spec.cross_attention:
                path = f"diffusion_model.{name}.forward"
                if not isinstance(model_patcher.object_patches.get(path), CrossAttentionForward):
                    model_patcher.add_object_patch(path, CrossAttentionForward(module))
                found += 1
        if not found:
            raise FamilyError(f"{settings.owner}: no '{spec.cross_attention}' modules in this {spec.name} model; this "
                              f"ComfyUI version builds it differently. Please report it.")
        install_attention_dispatcher(model_patcher)
    else:
        raise FamilyError(f"{settings.owner}: NAG has no attention hook for {spec.name}.")
    model_patcher.add_wrapper_with_key(apply_model, NAG_WRAPPER_KEY, NagInput(settings))


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
                    dit[patch_key] = current.with_options(record_text_length=True)
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


# ------------------------------------------------------------------------------------------------
# S-CFG: reading cross-attention maps (guiders/region_guidance.py does the math)
# ------------------------------------------------------------------------------------------------
# The engine puts a RegionRecorder into transformer_options[REGION_RECORDER_KEY] for evaluations
# where S-CFG acts. The hooks below read the cond rows (and the uncond rows when the foreground
# comes from them) of the selected layers only; no N×N attention matrix is built: the text map is
# N×T, and the self-attention completion runs as attention calls with the maps as values.

SCFG_FAMILIES = "SD1.5/SDXL (UNet), Flux, Chroma and SD3/SD3.5"
_SCFG_DIT = ("Flux", "Chroma", "SD3/SD3.5")
# Families whose text encoder puts a start token first ([SOT] of CLIP): the official foreground
# split (first token vs the rest) is meaningful there; T5-only families default to the whole image
SCFG_START_TOKEN = {"UNet (SD1.5/SDXL)": True, "SD3/SD3.5": True, "Flux": False, "Chroma": False}


def scfg_family_of(model_patcher, owner: str) -> FamilySpec:
    """The family of a model S-CFG can read attention maps from, else a FamilyError."""
    spec = None
    try:
        spec = family_of(model_patcher, owner)
    except FamilyError:
        pass
    if spec is None or not (spec.is_unet or spec.name in _SCFG_DIT):
        name = spec.name if spec is not None else type(diffusion_model_of(model_patcher)).__name__
        raise FamilyError(f"{owner}: this model family has no cross-attention map hook we support: {name}. S-CFG "
                          f"works on {SCFG_FAMILIES}; on other families use APG, CFG schedules or CFG-Zero* "
                          f"(every family).")
    return spec


def _entry_chunks(transformer_options: dict, batch_size: int, recorder) -> list[tuple[int, slice]]:
    """(entry, rows) of the chunks the recorder wants (0 = cond, 1 = uncond)."""
    chunks = transformer_options.get("cond_or_uncond")
    if not chunks:
        return []
    per = batch_size // len(chunks)
    if per * len(chunks) != batch_size:
        return []
    return [(entry, slice(i * per, (i + 1) * per)) for i, entry in enumerate(chunks) if recorder.wants_entry(entry)]


def _unet_layer_grid(extra_options: dict, recorder) -> tuple[int, int] | None:
    """The layer's token grid if S-CFG reads this layer in this forward (full-size input only)."""
    shape = extra_options.get("activations_shape")
    original = extra_options.get("original_shape")
    if shape is None or original is None or tuple(original[-2:]) != tuple(recorder.latent_hw):
        return None  # an area-conditioned crop, or an unknown layout: not part of the map
    grid = (int(shape[-2]), int(shape[-1]))
    return grid if recorder.wants_layer(grid) else None


def _observe_unet_self(key: tuple, q, k, extra_options: dict) -> None:
    recorder = extra_options.get(REGION_RECORDER_KEY)
    if recorder is None or recorder.order <= 0 or _unet_layer_grid(extra_options, recorder) is None:
        return
    recorder.pending[key] = (q, k)  # used by the same layer's cross-attention, right after


def _observe_unet_cross(key: tuple, q, k_text, extra_options: dict) -> None:
    recorder = extra_options.get(REGION_RECORDER_KEY)
    if recorder is None:
        return
    grid = _unet_layer_grid(extra_options, recorder)
    if grid is None:
        return
    heads = extra_options["n_heads"]
    pending = recorder.pending.pop(key, None)
    with torch.no_grad():
        for entry, rows in _entry_chunks(extra_options, q.shape[0], recorder):
            self_qk = None
            if pending is not None:
                self_qk = tuple(_to_bhld(t[rows], heads, False) for t in pending)
            _record(recorder, entry, _to_bhld(q[rows], heads, False), _to_bhld(k_text[rows], heads, False),
                    self_qk, grid)


def _record(recorder, entry: int, q_img, k_text, self_qk, grid) -> None:
    """Text map of one chunk → (foreground channels only for a foreground-only chunk) → completion."""
    maps = region_guidance.cross_attention_map(q_img, k_text)
    if entry != 0:
        maps = torch.stack([maps[..., 0], maps[..., 1:].sum(dim=-1)], dim=-1)
    q_self, k_self = self_qk if self_qk is not None else (None, None)
    maps = region_guidance.propagate(q_self, k_self, maps, recorder.order)
    if entry == 0:
        recorder.add(entry, maps, grid)
    else:
        recorder.add_foreground(entry, maps, grid)


def _observe_joint(ctx: BlockContext, args, kwargs) -> None:
    """S-CFG on a joint attention call: image queries × prompt text keys, image × image completion."""
    recorder = ctx.regions
    transformer_options = kwargs.get("transformer_options") or {}
    image = ctx.image
    if image is None or ctx.grid is None or len(ctx.grid) != 2:
        return
    grid = (int(ctx.grid[0]), int(ctx.grid[1]))
    skip_reshape = kwargs.get("skip_reshape", False)
    q, k = args[0], args[1]
    total = _tokens(q, kwargs)
    if image.stop - image.start != grid[0] * grid[1]:
        return
    if ctx.spec.image_first:
        text = slice(image.stop, total)
    elif ctx.nag is not None:
        text = slice(0, ctx.nag.negative_text_start)
    else:
        text = slice(0, image.start)
    if text.stop - text.start < 2:
        return
    heads = _heads_of(args, kwargs)
    qh, kh = _to_bhld(q, heads, skip_reshape), _to_bhld(k, heads, skip_reshape)
    with torch.no_grad():
        for entry, rows in _entry_chunks(transformer_options, qh.shape[0], recorder):
            q_img = qh[rows, :, image]
            k_img = kh[rows, :, image]
            self_qk = (q_img, k_img) if recorder.order > 0 else None
            _record(recorder, entry, q_img, kh[rows, :, text], self_qk, grid)


def install_region_hooks(model_patcher, spec: FamilySpec, dit_blocks: int) -> tuple:
    """Install S-CFG's map readers on a cloned ModelPatcher; returns the observed blocks/layers.

    UNet: our attn1 (self-attention queries/keys) and attn2 (text keys) replaces on every transformer
    layer; which layers are read is decided per forward from their resolution. Joint DiTs: the last
    ``dit_blocks`` double blocks get a ``DitBlockHook(regions=True)`` and the attention dispatcher.
    """
    import comfy.patcher_extension

    net = diffusion_model_of(model_patcher)
    to = model_patcher.model_options.setdefault("transformer_options", {})
    replace = to.setdefault("patches_replace", {})
    if spec.is_unet:
        keys = list(unet_layers(net))
        if not keys:
            raise FamilyError("S-CFG: this UNet has no transformer layers with cross-attention.")
        attn1 = dict(replace.get("attn1", {}))
        attn2 = dict(replace.get("attn2", {}))
        for key in keys:
            if not getattr(attn1.get(key), "is_guidance_kit", False):
                attn1[key] = UNetSelfAttentionHook(key, previous=attn1.get(key))
            if not isinstance(attn2.get(key), UNetCrossAttentionHook):
                attn2[key] = UNetCrossAttentionHook(key, previous=attn2.get(key))
        replace["attn1"], replace["attn2"] = attn1, attn2
        return tuple(keys)
    layout = block_layout(model_patcher, spec)
    doubles = layout.dit_blocks.get("double", 0)
    if doubles == 0:
        raise FamilyError(f"S-CFG: this {spec.name} model has no joint (double) blocks.")
    chosen = [("double", i) for i in range(max(0, doubles - dit_blocks), doubles)]
    dit = dict(replace.get("dit", {}))
    for group, index in chosen:
        patch_key = _dit_patch_key(group, index)
        current = dit.get(patch_key)
        if getattr(current, "is_guidance_kit", False):
            dit[patch_key] = current.with_options(regions=True)
        else:
            dit[patch_key] = DitBlockHook(spec, (group, index), previous=current, regions=True)
    replace["dit"] = dit
    install_attention_dispatcher(model_patcher)
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if not model_patcher.get_wrappers(apply_model, WRAPPER_KEY):
        model_patcher.add_wrapper_with_key(apply_model, WRAPPER_KEY, latent_shape_wrapper)
    return tuple(chosen)


# ------------------------------------------------------------------------------------------------
# weight deltas (a LoRA / patch difference on one branch's rows): nodes/row_delta.py, re-exported above
# ------------------------------------------------------------------------------------------------
