"""Block and attention perturbations of an extra branch: PAG, SEG, TPG, skip-layer (SLG/STG), S²-Guidance.

The branch's rows run the model with the chosen blocks perturbed, in the same forward as cond and uncond
(every other row runs the unmodified model). The operators are pure torch (``guiders/attention_ops.py``);
this contributor applies them where each family puts them:

* UNet: attention operators (PAG's identity attention, SEG's query blur) in the layer's ``attn1`` replace;
  block operators (skip, drop, token shuffle) in the transformer layer's ``forward`` patch. TPG's tokens are
  permuted before the layer and not restored (the official pipeline: a transformer layer without positional
  encoding is permutation-equivariant, so restoring would undo the perturbation).
* DiTs: the block hook; skip/drop give the rows their ``img``/``txt`` inputs back; TPG permutes the image
  tokens before the block and restores them after (rotary families only); attention operators act in the
  block's self-attention call (the joint call of joint families; the first call, maybe in query slices,
  on WAN/LTXV), reached through the attention dispatcher.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...guiders import attention_ops
from ...guiders.plan import BranchEffect
from ...guiders.sparse_attention import tempered_attention
from ..runtime import install as installer
from ..runtime import prefix_fork
from ..runtime.attention_layout import from_bhld, heads_of, select_rows, split_rows, take, to_bhld
from ..runtime.families import FamilyError, FamilySpec
from ..runtime.rows import BRANCH_MAP_KEY, Forward
from ..runtime.slots import BlockCall, Contributor, Guarded, LayerCall, mark_applied


@dataclass(frozen=True)
class Perturbation(BranchEffect, Guarded):
    """What a branch changes in the model, where.

    ``operator``: identity_attention (PAG), smoothed_attention (SEG, ``sigma``), token_shuffle (TPG),
    skip (skip-layer guidance), drop (S²-Guidance: ``drop_ratio`` of ``blocks`` resampled every step),
    tempered_attention (ERG, ``temperature``).
    ``blocks``: resolved keys, UNet ``(group, block, layer)`` / DiT ``(group, index)``.
    """

    method: str
    operator: str
    family: str
    blocks: tuple[tuple, ...] = ()
    sigma: float = 0.0
    drop_ratio: float = 0.0
    seed: int = 0
    temperature: float = 1.0

    def perturbed_blocks(self, noise: int) -> tuple:
        """The blocks it perturbs at the noise level ``noise``: its branch shares everything before the first
        (``runtime/prefix_fork.py``)."""
        return dropped_blocks(self, noise) if self.operator == "drop" else self.blocks

    def acts_on(self, key: tuple, noise: int) -> bool:
        if self.operator == "drop":
            return key in dropped_blocks(self, noise)
        return key in self.blocks


_DROP_CACHE: dict[tuple, tuple] = {}


def dropped_blocks(p: Perturbation, noise: int) -> tuple:
    """The blocks S²-Guidance drops at the noise level ``noise`` (``Forward.noise_key``): reproducible, seeded by
    the node's seed and σ, so a split run drops the same blocks at the same σ."""
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


def active(forward: Forward, key: tuple, operators: tuple[str, ...]) -> list[tuple[Perturbation, torch.Tensor]]:
    """(perturbation, row indices) for the branches in this forward whose perturbation acts on ``key``."""
    step = []  # the noise key, computed once and only for block dropping

    def accept(p) -> bool:
        if not isinstance(p, Perturbation) or p.operator not in operators:
            return False
        if p.operator == "drop" and not step:
            step.append(forward.noise_key)
        return p.acts_on(key, step[0] if step else 0)

    return forward.branch_rows(accept)


def _identity_attention(p: Perturbation, q, k, v, mask, image: slice | None, grid, query: slice | None):
    """PAG. Exact on a query slice too: each query keeps its own value (``v[query]``; a guide mask's bias on the
    diagonal is 0)."""
    if query is not None:
        return v[:, :, query].clone()
    return attention_ops.identity_self_attention(q, k, v, image=image, mask=mask)


def _smoothed_attention(p: Perturbation, q, k, v, mask, image: slice | None, grid, query: slice | None):
    """SEG: the query blur needs a frame's queries together (no query slices) and the latent's own token grid."""
    if query is not None:
        raise RuntimeError(f"{p.method} ({p.family}): ComfyUI runs this block's self-attention as several calls "
                           f"over query groups (LTXV guides with a strength other than 1 or a pixel mask), and "
                           f"SEG's query blur needs all queries of a frame in one call. Use PAG (it handles the "
                           f"split), or guides at strength 1 without a mask.")
    if grid is None:
        raise RuntimeError(f"{p.method}: the image token grid is unknown in this block")
    length = q.shape[-2] if image is None else (image.stop - image.start)
    if math.prod(grid) != length:
        raise RuntimeError(f"{p.method} ({p.family}): this block has {length} image tokens but the latent's token "
                           f"grid {tuple(grid)} holds {math.prod(grid)}: the model appended reference or guide "
                           f"tokens (e.g. Flux Kontext / Flux 2 reference images, LTXV keyframe guides, WAN "
                           f"reference frames), and SEG's blur needs the latent's own grid. Use PAG on such a "
                           f"model, or remove the reference inputs.")
    return attention_ops.smoothed_energy_attention(q, k, v, grid, p.sigma, image=image, mask=mask)


def _tempered_attention(p: Perturbation, q, k, v, mask, image: slice | None, grid, query: slice | None):
    """ERG: the whole call's attention at temperature ``p.temperature`` (exact on a query slice: rows of the map
    are independent)."""
    return tempered_attention(q, k, v, p.temperature, mask)


@dataclass(frozen=True)
class AttentionOperator:
    """``apply(p, q, k, v [B, H, L, D], mask, image tokens, token grid, query slice or None)`` → the output;
    ``needs_grid``: it reads the image token grid (DiTs then publish the latent shape)."""

    apply: Callable
    needs_grid: bool = False


ATTENTION_OPERATORS = {"identity_attention": AttentionOperator(_identity_attention),
                       "smoothed_attention": AttentionOperator(_smoothed_attention, needs_grid=True),
                       "tempered_attention": AttentionOperator(_tempered_attention)}
BLOCK_OPERATORS = ("skip", "token_shuffle", "drop")


def perturbed_attention(p: Perturbation, q, k, v, heads: int, skip_reshape: bool, skip_output_reshape: bool,
                        mask, image: slice | None, grid: tuple[int, ...] | None, query: slice | None = None
                        ) -> torch.Tensor:
    """Apply ``p``'s attention operator to rows already selected, in ComfyUI's layouts.

    ``query``: a plain self-attention run as several calls over query slices (newer LTXV with guide
    masks): the slice of the block's tokens this call's queries are (passed on only when it is a part).
    """
    operator = ATTENTION_OPERATORS.get(p.operator)
    if operator is None:
        raise RuntimeError(f"{p.method}: {p.operator} is not an attention operator")
    qh, kh, vh = (to_bhld(t, heads, skip_reshape) for t in (q, k, v))
    m = mask
    if m is not None and m.ndim == 2:
        m = m[None, None]
    elif m is not None and m.ndim == 3:
        m = m[:, None]
    partial = query is not None and (query.start != 0 or query.stop != kh.shape[-2])
    return from_bhld(operator.apply(p, qh, kh, vh, m, image, grid, query if partial else None), skip_output_reshape)


def _permutation(p: Perturbation, n: int, noise: int, key: tuple) -> torch.Tensor:
    """TPG's permutation of n tokens for one block at one noise level."""
    return attention_ops.permutation(n, attention_ops.seeded_generator(p.seed, noise, stable_key(key)))


class BlockPerturbations(Contributor):
    """The perturbations' part in the block, attention and UNet slots."""

    ORDER = 30  # innermost: NAG's views and S-CFG's reading run around it
    NAME = "perturbation"

    def present(self, transformer_options: dict) -> bool:
        return bool(transformer_options.get(BRANCH_MAP_KEY))

    # --- DiT blocks -----------------------------------------------------------------------------------------

    def block(self, call: BlockCall) -> None:
        groups = active(Forward(call.options, call.batch_size), call.key, (*ATTENTION_OPERATORS, *BLOCK_OPERATORS))
        if not groups:
            return
        mark_applied(call.options, [(p, rows) for p, rows in groups if p.operator in BLOCK_OPERATORS])
        attention = [(p, rows) for p, rows in groups if p.operator in ATTENTION_OPERATORS]
        if attention and not call.spec.joint:
            _check_self_attention(call, attention)
        shuffles = [(p, rows) for p, rows in groups if p.operator == "token_shuffle"]
        if shuffles:
            self._shuffle(call, shuffles)
        for p, rows in groups:
            if p.operator in ("skip", "drop"):
                call.keep_inputs(rows)
        if attention:
            call.attention_context().parts[self] = attention

    def _shuffle(self, call: BlockCall, shuffles) -> None:
        """TPG: permute the image tokens of the branch rows before the block, restore them after."""
        img = call.args["img"]
        shape = img.shape
        img = img.flatten(1, -2)  # [B, T, H, W, D] (Cosmos Predict2) → [B, L, D]
        span = call.image_span()
        span = slice(0, img.shape[1]) if span is None else span
        noise = Forward(call.options, call.batch_size).noise_key
        shuffled = img.clone()
        applied = []
        for p, rows in shuffles:
            perm = _permutation(p, span.stop - span.start, noise, call.key)
            rows = rows.to(img.device)
            shuffled[rows] = attention_ops.shuffle_tokens(img[rows], perm, dim=1, span=span)
            applied.append((rows, attention_ops.inverse_permutation(perm)))
        call.set("img", shuffled.view(shape))

        def undo(out: dict) -> dict:
            out = dict(out)
            result = out["img"].flatten(1, -2)
            value = result.clone()
            for rows, inverse in applied:
                value[rows] = attention_ops.shuffle_tokens(result[rows], inverse, dim=1, span=span)
            out["img"] = value.view(out["img"].shape)
            return out

        call.undo_after(undo)

    def attention(self, call, inner):
        ctx = call.ctx
        groups = ctx.parts.get(self) if ctx is not None else None
        if not groups:
            return inner(call)
        query = None
        if not ctx.spec.joint:  # WAN / LTXV: the self-attention first (maybe as query slices), then cross-attention
            query = ctx.self_attention_queries(call.args, call.kwargs, _methods(groups))
            if query is None:
                return inner(call)
        args, kwargs = call.args, call.kwargs
        batch_size = call.batch_size
        heads = heads_of(args, kwargs)
        skip_reshape = kwargs.get("skip_reshape", False)
        skip_output_reshape = kwargs.get("skip_output_reshape", False)
        mark_applied(call.options, groups)

        def perturbed(p, rows):
            q, k, v = (take(a, rows, batch_size) for a in args[:3])
            return perturbed_attention(p, q, k, v, heads, skip_reshape, skip_output_reshape,
                                       take(kwargs.get("mask"), rows, batch_size), call.image, ctx.grid, query)

        return split_rows(batch_size, groups, perturbed, lambda rows: inner(call.rows(rows)))

    # --- UNet ---------------------------------------------------------------------------------------------

    def unet_self_attention(self, call, inner):
        batch_size = call.q.shape[0]
        groups = active(Forward(call.options, batch_size), call.key, ATTENTION_OPERATORS)
        if not groups:
            return inner(call)
        mark_applied(call.options, groups)
        heads = call.options["n_heads"]
        shape = call.options.get("activations_shape")
        grid = tuple(shape[-2:]) if shape is not None else None
        q, k, v = call.q, call.k, call.v
        return split_rows(batch_size, groups,
                          lambda p, rows: perturbed_attention(p, *(select_rows(t, rows) for t in (q, k, v)), heads,
                                                              False, False, None, None, grid),
                          lambda rows: inner(call.with_qkv(*(select_rows(t, rows) for t in (q, k, v)))))

    def layer(self, call: LayerCall) -> None:
        forward = Forward(call.options, call.batch_size)
        groups = active(forward, call.key, BLOCK_OPERATORS)
        if not groups:
            return
        mark_applied(call.options, groups)
        x = call.x
        for p, rows in groups:
            if p.operator == "token_shuffle":
                perm = _permutation(p, x.shape[1], forward.noise_key, call.key)
                x = x.clone() if x is call.x else x
                x[rows] = attention_ops.shuffle_tokens(x[rows], perm)
        call.set_input(x)
        for p, rows in groups:
            if p.operator in ("skip", "drop"):
                call.keep_inputs(rows)


def _methods(groups) -> str:
    return ", ".join(sorted({p.method for p, _ in groups}))


def _check_self_attention(call: BlockCall, attention_groups) -> None:
    """Attention operators on a non-joint block (WAN, LTXV): its self-attention must run as ours to
    perturb. Newer ComfyUI's LTXV can skip a block's self-attention for every row (the STG option
    ``stg_self_attn_blocks``: out = V, PAG's own operator on all rows, so the branch would equal the
    cond) or split it into query groups (guide masks: PAG handles that, SEG cannot)."""
    spec, methods = call.spec, _methods(attention_groups)
    if call.options.get("stg_skip_self_attn"):
        raise FamilyError(f"{methods} ({spec.name}): block {call.key[1]}'s self-attention is already "
                          f"replaced by its values on every row (ComfyUI's LTXV STG option "
                          f"'stg_self_attn_blocks', set by another node), so the branch would equal the "
                          f"conditional prediction. Remove that STG node or choose other layers.")
    if call.args.get("self_attention_mask") is not None and any(p.operator == "smoothed_attention"
                                                                for p, _ in attention_groups):
        raise FamilyError(f"SEG ({spec.name}): this LTXV call carries a guide attention mask (guides with a "
                          f"strength other than 1 or a pixel mask), so ComfyUI splits block {call.key[1]}'s "
                          f"self-attention into query groups, and SEG's query blur needs all queries of a frame in "
                          f"one call. Use PAG (it handles the split), or guides at strength 1 without a mask.")


CONTRIBUTOR = BlockPerturbations()


def install(model_patcher, spec: FamilySpec, layout, perturbation: Perturbation) -> None:
    """Install the slots ``perturbation`` acts through on a cloned ModelPatcher (idempotent)."""
    operator = ATTENTION_OPERATORS.get(perturbation.operator)
    attention = operator is not None
    if spec.is_unet:
        if attention:
            installer.unet_attention(model_patcher, "attn1", perturbation.blocks, CONTRIBUTOR)
        else:
            installer.unet_layers(model_patcher, perturbation.blocks, CONTRIBUTOR)
    else:
        installer.dit_blocks(model_patcher, spec, layout, perturbation.blocks, CONTRIBUTOR)
        if attention:
            installer.attention(model_patcher, CONTRIBUTOR)
    installer.guard(model_patcher)
    prefix_fork.install(model_patcher, spec, layout, perturbation.blocks, latest=perturbation.operator == "drop")
    if attention and operator.needs_grid and not spec.is_unet:
        installer.latent_shape(model_patcher)
