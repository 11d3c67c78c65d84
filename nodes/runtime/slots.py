"""The pack's occupants of ComfyUI's hook slots: multiplexers that call the contributors registered on them.

No model forward is re-implemented: every slot calls ComfyUI's own block or attention (or the occupant it
replaced, ``previous``). A slot knows where it is (a DiT block, an attention call inside it, a UNet layer)
and nothing of the methods: each method that acts there is a ``Contributor`` (``nodes/contributors``),
registered on the slot at installation (``install.py``) and called in ``ORDER`` (outer first):

* ``DitBlockHook`` — ``patches_replace["dit"][(kind, i)]``: contributors' ``block(call)`` may rewrite the
  block's inputs and undo it after (``call.args``, ``call.after``), let rows keep their inputs
  (``call.keep_inputs``: the block is skipped for them) or open a ``BlockContext`` that the block's
  attention calls see (``call.attention_context()``). Joint double blocks record the text length, which
  the single blocks after them need to find their image tokens.
* ``AttentionDispatcher`` — ``transformer_options["optimized_attention_override"]``: contributors'
  ``attention(call, inner)`` act on the call or pass it (or views of it) to the next one; the last one's
  ``inner`` is the plain attention.
* ``UNetSelfAttentionHook`` / ``UNetCrossAttentionHook`` — ``patches_replace["attn1"/"attn2"]``, the same
  chain over ``UNetAttention`` calls; ``UNetLayerForward`` — an object patch of a transformer layer's
  ``forward`` (the module tree and weight keys stay unchanged, so LoRAs keep working), with ``layer(call)``.
* ``applied_guard`` — an APPLY_MODEL wrapper: a ``Guarded`` branch effect that never reached the model in
  a forward that carries it is an error (another node replaced our patch), never a silent no-op.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from .attention_layout import take, tokens
from .blocks import image_grid
from .families import FamilyError, FamilySpec
from .rows import Forward

OVERRIDE_KEY = "optimized_attention_override"
BLOCK_CONTEXT_KEY = "guidance_kit_block"  # transformer_options of a block call: its BlockContext
TEXT_LENGTH_KEY = "guidance_kit_text_length"  # transformer_options: text tokens of the joint double blocks
LATENT_SHAPE_KEY = "guidance_kit_latent_shape"  # transformer_options: the latent's shape (token grids)
APPLIED_KEY = "guidance_kit_applied"  # transformer_options: the Guarded effects that acted in this forward
IMAGE_TOKENS_KEY = "guidance_kit_image_tokens"  # transformer_options: Lumina2's image tokens after its caption


class Contributor:
    """A method's part in the shared slots. A slot calls the hooks below on the contributors registered on it;
    the defaults pass everything through. ``present``: this forward carries the contributor's work."""

    ORDER: ClassVar[int] = 50  # outer (lower) first
    NAME: ClassVar[str] = ""

    def __deepcopy__(self, memo) -> Contributor:
        return self  # stateless: ModelPatcher.clone deep-copies model_options, the slots keep the same contributors

    def present(self, transformer_options: dict) -> bool:
        return False

    def block(self, call: BlockCall) -> None:
        """A DiT block is about to run."""

    def attention(self, call: AttentionCall, inner: Callable[[AttentionCall], torch.Tensor]) -> torch.Tensor:
        return inner(call)

    def unet_self_attention(self, call: UNetAttention, inner) -> torch.Tensor:
        return inner(call)

    def unet_cross_attention(self, call: UNetAttention, inner) -> torch.Tensor:
        return inner(call)

    def layer(self, call: LayerCall) -> None:
        """A UNet transformer layer is about to run."""


class ModulePatch:
    """An object patch of one module's method ``METHOD`` that chains to the occupant it replaced (``previous``)."""

    METHOD: ClassVar[str] = "forward"

    def __init__(self, module, previous=None):
        self.module = module
        self.previous = previous

    def original(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return getattr(type(self.module), self.METHOD)(self.module, *args, **kwargs)


class Slot:
    """Our occupant of one slot; chains to the occupant it replaced and calls its contributors."""

    is_guidance_kit = True
    previous = None
    contributors: tuple = ()

    def with_contributor(self, contributor: Contributor | None) -> Slot:
        """This occupant with ``contributor`` registered too (a copy: clones of a model share the original)."""
        if contributor is None or contributor in self.contributors:
            return self
        out = copy.copy(self)
        out.contributors = tuple(sorted((*self.contributors, contributor), key=lambda c: (c.ORDER, c.NAME)))
        return out

    def _chain(self, method: str, plain, call, i: int = 0):
        if i == len(self.contributors):
            return plain(call)
        return getattr(self.contributors[i], method)(call, lambda view: self._chain(method, plain, view, i + 1))


# ------------------------------------------------------------------------------------------------
# applied effects
# ------------------------------------------------------------------------------------------------

class Guarded:
    """A branch effect (with ``method`` and ``family``) that acts through a slot and must reach the model in every
    forward whose rows carry it (``applied_guard``); its contributor calls ``mark_applied``."""


class PerturbationNotApplied(RuntimeError):
    """A branch's perturbation never reached the model: its hook was replaced or bypassed."""


def mark_applied(transformer_options: dict, groups) -> None:
    """Record that these branches' effects acted in this forward (see ``applied_guard``)."""
    applied = transformer_options.get(APPLIED_KEY)
    if applied is not None:
        applied.update(p for p, _ in groups)


def applied_guard(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: every ``Guarded`` branch effect in this forward must act at least once.

    Another node can replace our block/attention patches after ours (they are single slots), and
    a model update can stop calling a hook; the branch would then equal the cond and the method
    would silently do nothing while costing a branch. This turns that into an error.
    """
    transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options")
    if not isinstance(transformer_options, dict):
        return executor(x, t, *args, **kwargs)
    expected = {p for p, _ in Forward(transformer_options, x.shape[0]).of_type(Guarded)}
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


def latent_shape_wrapper(executor, x, *args, **kwargs):
    """APPLY_MODEL wrapper: publish the latent shape (for token grids) to the blocks of this forward."""
    transformer_options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
    if isinstance(transformer_options, dict):
        transformer_options[LATENT_SHAPE_KEY] = tuple(x.shape)
    return executor(x, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# DiT blocks and the attention calls inside them
# ------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class BlockContext:
    """Set by a DiT block hook for the duration of one block call; its attention calls find it."""

    spec: FamilySpec
    key: tuple
    options: dict  # the block's transformer_options
    image: slice | None = None  # image tokens inside the joint attention call (None = all tokens)
    tokens: int | None = None  # non-joint families: the block's token count (its self-attention's keys)
    calls: int = 0
    covered: int = 0  # non-joint families: self-attention queries seen so far in this block call
    parts: dict = field(default_factory=dict)  # contributor → what it acts with in this block
    _grid: tuple = ()

    @property
    def grid(self) -> tuple[int, ...] | None:
        """The image token grid (from the latent shape; None when unknown)."""
        if not self._grid:
            self._grid = (image_grid(self.spec, self.options.get(LATENT_SHAPE_KEY)),)
        return self._grid[0]

    def self_attention_queries(self, args, kwargs, owners: str) -> slice | None:
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
        queries, keys = tokens(args[0], kwargs), tokens(args[1], kwargs)
        if keys != self.tokens or self.covered + queries > self.tokens:
            raise RuntimeError(
                f"{owners} ({self.spec.name}): block {self.key[1]}'s first attention call has {queries} queries "
                f"against {keys} keys, not the self-attention over the block's {self.tokens} tokens this family "
                f"starts with, so the perturbation would act on the wrong attention. Another node changed this "
                f"block's attention (e.g. an STG option that skips its self-attention), or this ComfyUI version "
                f"calls it differently; remove that node or choose other layers, and please report it.")
        start = self.covered
        self.covered += queries
        return slice(start, start + queries)


class BlockCall:
    """One DiT block call as its contributors see it."""

    def __init__(self, spec: FamilySpec, key: tuple, args: dict, options: dict):
        self.spec = spec
        self.key = key
        self.args = dict(args)  # what the block will get (contributors may replace entries)
        self.options = options
        self.batch_size = args["img"].shape[0]
        self.keep: list[torch.Tensor] = []
        self.after: list[Callable[[dict], dict]] = []
        self.context: BlockContext | None = None
        self.changed = False

    def set(self, name: str, value) -> None:
        self.args[name] = value
        self.changed = True

    def keep_inputs(self, rows: torch.Tensor) -> None:
        """These rows skip the block: they get its inputs back."""
        self.keep.append(rows)
        self.changed = True

    def undo_after(self, undo: Callable[[dict], dict]) -> None:
        self.after.append(undo)
        self.changed = True

    def attention_context(self) -> BlockContext:
        """The context this block's attention calls see (one per block call)."""
        if self.context is None:
            self.context = BlockContext(self.spec, self.key, self.options)
            self.changed = True
        return self.context

    @property
    def text_length(self) -> int | None:
        return self.options.get(TEXT_LENGTH_KEY)

    def image_span(self) -> slice | None:
        """Image tokens inside this block's stream ``args["img"]`` (joint single blocks carry text too)."""
        if not self.spec.joint or self.key[0] == "double":
            return None
        text = self.text_length
        if text is None:
            raise RuntimeError(f"Guidance Kit: the text length of {self.spec.name} single blocks is unknown")
        total = self.args["img"].shape[1]
        if self.spec.block_hook == "layers":  # Lumina2: the image tokens may be followed by pad tokens
            return slice(text, text + self.options[IMAGE_TOKENS_KEY])
        return slice(0, total - text) if self.spec.image_first else slice(text, total)

    def attention_image(self) -> slice | None:
        """Image tokens inside the joint attention call."""
        if not self.spec.joint:
            return None
        if self.key[0] == "double":
            text, image = self.args["txt"].shape[1], self.args["img"].shape[1]
            return slice(0, image) if self.spec.image_first else slice(text, text + image)
        return self.image_span()


class DitBlockHook(Slot):
    """Our occupant of ``patches_replace["dit"][(kind, i)]``; chains to a previous occupant."""

    def __init__(self, spec: FamilySpec, key: tuple[str, int], previous=None, contributors: tuple = ()):
        self.spec = spec
        self.key = key
        self.previous = previous
        self.contributors = contributors

    def _run(self, args, extra):
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        to = args.get("transformer_options")
        if to is None:
            return self._run(args, extra)
        if not torch.is_tensor(args.get("img")):
            if not any(c.present(to) for c in self.contributors):
                return self._run(args, extra)
            raise FamilyError(f"Guidance Kit: {self.spec.name} block {self.key[1]} received "
                              f"{type(args.get('img')).__name__} as its tokens instead of one tensor: this model is "
                              f"built differently from {self.spec.name} (e.g. LTX-2's (video, audio) pair), so no "
                              f"block perturbation can act on it. Remove the Guidance Kit perturbation/NAG/S-CFG node "
                              f"from this model; TSG, ICG and the CFG-space methods work on every family.")
        if self.spec.joint and self.key[0] == "double" and "txt" in args:
            to[TEXT_LENGTH_KEY] = args["txt"].shape[1]  # for the single blocks after this one
        call = BlockCall(self.spec, self.key, args, to)
        for contributor in self.contributors:
            contributor.block(call)
        if not call.changed:
            return self._run(args, extra)
        args = call.args
        if call.context is not None:
            call.context.image = call.attention_image()
            call.context.tokens = None if self.spec.joint else math.prod(args["img"].shape[1:-1])  # [B, (T, H, W,) D]
            local = dict(to)
            local[BLOCK_CONTEXT_KEY] = call.context
            args["transformer_options"] = local
        out = self._run_keeping(args, extra, torch.cat(call.keep)) if call.keep else self._run(args, extra)
        for undo in reversed(call.after):
            out = undo(out)
        return out

    def _run_keeping(self, args, extra, kept: torch.Tensor) -> dict:
        """Rows in ``kept`` return the block's inputs (the block is skipped for them).

        The block still runs on the whole batch: blocks are row-independent, and slicing every
        per-row argument (modulation tuples, masks, rotary tables) differs per family and version.
        """
        kept_inputs = {}  # copied first: some blocks update their inputs in place
        for name in ("img", "txt"):
            value = args.get(name)
            if torch.is_tensor(value):
                kept_inputs[name] = (value.shape, value[kept.to(value.device)].clone())
        out = dict(self._run(args, extra))
        for name, (shape, original) in kept_inputs.items():
            value = out.get(name)
            if torch.is_tensor(value) and value.shape == shape:
                merged = value.clone()
                merged[kept.to(merged.device)] = original.to(merged.dtype)
                out[name] = merged
        return out


_SAME = object()


@dataclass(eq=False)
class AttentionCall:
    """One ``optimized_attention`` call as the dispatcher's contributors see it (``plain``: the attention it
    stands for; ``image``: the image tokens of a joint call; ``index``: its number inside the block)."""

    func: Callable
    args: tuple
    kwargs: dict
    ctx: BlockContext | None
    index: int
    image: slice | None
    plain: Callable

    @property
    def options(self) -> dict:
        return self.kwargs.get("transformer_options") or {}

    @property
    def batch_size(self) -> int:
        return self.args[0].shape[0]

    def view(self, args, kwargs, image=_SAME) -> AttentionCall:
        return replace(self, args=tuple(args), kwargs=kwargs, image=self.image if image is _SAME else image)

    def rows(self, rows: torch.Tensor) -> AttentionCall:
        """The call restricted to the batch rows ``rows``."""
        n = self.batch_size
        return self.view([take(a, rows, n) for a in self.args], {k: take(v, rows, n) for k, v in self.kwargs.items()})


class AttentionDispatcher(Slot):
    """``optimized_attention_override``: the contributors' chain around every attention call of the model.
    Chains to the override that was there before."""

    def __init__(self, previous=None, contributors: tuple = ()):
        self.previous = previous
        self.contributors = contributors

    def plain(self, call: AttentionCall) -> torch.Tensor:
        if self.previous is not None:
            return self.previous(call.func, *call.args, **call.kwargs)
        return call.func(*call.args, **call.kwargs)

    def __call__(self, func, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        ctx: BlockContext | None = transformer_options.get(BLOCK_CONTEXT_KEY)
        index, image = 0, None
        if ctx is not None:
            ctx.calls += 1
            index = ctx.calls
            if ctx.spec.joint and index == 1:  # the joint call; later calls: MMDiT-X image self-attention
                image = ctx.image
        call = AttentionCall(func, args, kwargs, ctx, index, image, self.plain)
        return self._chain("attention", self.plain, call)


# ------------------------------------------------------------------------------------------------
# UNet
# ------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class UNetAttention:
    """One UNet attn1/attn2 replace call (``options``: its extra_options)."""

    key: tuple
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    options: dict
    plain: Callable  # the attention this replace stands for (the previous occupant's, else ComfyUI's)

    def with_qkv(self, q, k, v) -> UNetAttention:
        return replace(self, q=q, k=k, v=v)


def unet_attention(previous, q, k, v, extra_options):
    """The attention a UNet attn1/attn2 replace stands for: the previous occupant's, else ComfyUI's."""
    if previous is not None:
        return previous(q, k, v, extra_options)
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


class UNetSelfAttentionHook(Slot):
    """Our occupant of ``patches_replace["attn1"][(group, block, layer)]``."""

    METHOD = "unet_self_attention"

    def __init__(self, key: tuple[str, int, int], previous=None, contributors: tuple = ()):
        self.key = key
        self.previous = previous
        self.contributors = contributors

    def plain(self, call: UNetAttention) -> torch.Tensor:
        return unet_attention(self.previous, call.q, call.k, call.v, call.options)

    def __call__(self, q, k, v, extra_options):
        return self._chain(self.METHOD, self.plain, UNetAttention(self.key, q, k, v, extra_options, self.plain))


class UNetCrossAttentionHook(UNetSelfAttentionHook):
    """Our occupant of ``patches_replace["attn2"][(group, block, layer)]``."""

    METHOD = "unet_cross_attention"


class LayerCall:
    """One UNet transformer layer call as its contributors see it."""

    def __init__(self, key: tuple, x: torch.Tensor, options: dict):
        self.key = key
        self.x = x
        self.options = options
        self.batch_size = x.shape[0]
        self.keep: list[torch.Tensor] = []
        self.changed = False

    def set_input(self, x: torch.Tensor) -> None:
        self.x = x
        self.changed = True

    def keep_inputs(self, rows: torch.Tensor) -> None:
        """These rows skip the layer: they get its input back."""
        self.keep.append(rows)
        self.changed = True


class UNetLayerForward(Slot, ModulePatch):
    """Object patch of one BasicTransformerBlock's ``forward``: its contributors may rewrite the input rows or
    let rows skip the layer. The layer runs on every row (rows of other branches still need their own hooks
    inside it); skipped rows then get their inputs back."""

    def __init__(self, module, key: tuple[str, int, int], previous=None, contributors: tuple = ()):
        ModulePatch.__init__(self, module, previous)
        self.key = key
        self.contributors = contributors

    def __call__(self, x, context=None, transformer_options=None):
        to = transformer_options if transformer_options is not None else {}
        call = LayerCall(self.key, x, to)
        for contributor in self.contributors:
            contributor.layer(call)
        if not call.changed:
            return self.original(x, context=context, transformer_options=to)
        x = call.x
        if not call.keep:
            return self.original(x, context=context, transformer_options=to)
        index = torch.cat(call.keep).to(x.device)
        kept_inputs = x[index].clone()
        out = self.original(x, context=context, transformer_options=to).clone()
        out[index] = kept_inputs.to(out.dtype)
        return out
