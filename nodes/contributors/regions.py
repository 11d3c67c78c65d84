"""S-CFG's readers: cross-attention maps of the cond (and uncond) rows, inside the batched forward.

Per evaluation where S-CFG acts, the engine asks ``REGION_EVALUATION`` (an ``EvaluationHook``) for a
``RegionRecorder`` and puts it into ``transformer_options[REGION_RECORDER_KEY]``; the readers below add one map
per read layer for the cond chunk (and a 2-channel foreground map for the uncond chunk): UNet ``attn1``
(self-attention q/k) and ``attn2`` (text keys, never the NAG negative's) on every transformer layer, which
layers are read being decided per forward from their resolution; the joint attention of the last double
blocks of Flux/Chroma/SD3 through the block hook and the attention dispatcher. No N×N attention matrix is
built: the text map is N×T, and the self-attention completion runs as attention calls with the maps as
values (``guiders/region_guidance.py`` does the math). After the call the maps become ``RegionMaps``
(``StepInputs.regions``), also recorded into the S-CFG node's ``RegionMapStore`` (``REGION_STORE_KEY``).
"""

from __future__ import annotations

import math

import torch

from ...guiders import region_guidance
from ...guiders.methods.scfg import SCFG
from ...guiders.region_guidance import RegionRecorder
from ..runtime import install as installer
from ..runtime.attention_layout import heads_of, to_bhld, tokens
from ..runtime.blocks import block_layout, unet_layers
from ..runtime.engine import EvaluationHook, GuidanceRuntimeError, add_evaluation_hook
from ..runtime.families import FamilyError, FamilySpec, diffusion_model_of
from ..runtime.rows import Forward, sigma_value
from ..runtime.slots import BlockCall, Contributor
from .nag import CROSS_ATTENTION_KEY, NAG, NAG_KEY, CrossAttentionForward

REGION_RECORDER_KEY = "guidance_kit_scfg"  # transformer_options: the S-CFG RegionRecorder of this evaluation
REGION_STORE_KEY = "guidance_kit_scfg_maps"  # model_options: the RegionMapStore of an S-CFG node


class RegionEvaluation(EvaluationHook):
    """The engine's side of S-CFG: a recorder per evaluation where it acts, the maps after the call."""

    KEY = REGION_RECORDER_KEY

    def begin(self, plan, position, sigma, x, guided: bool):
        sc = plan.get(SCFG.KEY)
        if sc is None or not guided or x.ndim not in (4, 5) or not sc.active(position.progress, sigma_value(sigma)):
            return None
        return RegionRecorder(tuple(x.shape[-2:]), sc.downsample, sc.order, sc.reference,
                              step_index=position.step_index)

    def finish(self, plan, recorder, model_options: dict, run) -> dict:
        regions = recorder.finish()
        if regions is None:
            sc = plan.get(SCFG.KEY)
            raise GuidanceRuntimeError(
                f"{sc.label}: no cross-attention map was recorded in this step, so S-CFG cannot build its "
                f"regions. Either no attention layer is at 1/{sc.downsample} of the latent resolution or coarser "
                f"(lower 'downsample'; SDXL has none at 1/8), or another node replaced Guidance Kit's attention "
                f"patches after the S-CFG node (put S-CFG after it).")
        store = model_options.get(REGION_STORE_KEY)
        if store is not None:
            store.record(run, regions)
        return {"regions": regions}

    def check(self, plan, run, position, sigma: float, inputs: dict, uncond_evaluated: bool) -> None:
        sc = plan.get(SCFG.KEY)
        if sc is not None and inputs.get("regions") is None and uncond_evaluated and sc.active(position.progress,
                                                                                                sigma):
            run.warn_once("scfg-no-maps", f"{sc.label}: this step ran outside Guidance Kit's batched evaluation "
                                          f"(another node took the calc-cond-batch slot), so no attention map was "
                                          f"read and S-CFG acts as plain CFG here.")


def _unet_layer_grid(extra_options: dict, recorder) -> tuple[int, int] | None:
    """The layer's token grid if S-CFG reads this layer in this forward (full-size input only)."""
    shape = extra_options.get("activations_shape")
    original = extra_options.get("original_shape")
    if shape is None or original is None or tuple(original[-2:]) != tuple(recorder.latent_hw):
        return None  # an area-conditioned crop, or an unknown layout: not part of the map
    grid = (int(shape[-2]), int(shape[-1]))
    return grid if recorder.wants_layer(grid) else None


def _record(recorder, entry: int, q_img, k_text, self_qk, grid, frames: int = 1) -> None:
    """Text map of one chunk → (foreground channels only for a foreground-only chunk) → completion (over all the
    video's tokens: spatio-temporal) → one map per frame (``frames`` > 1: folded into the batch)."""
    maps = region_guidance.cross_attention_map(q_img, k_text)
    if entry != 0:
        maps = torch.stack([maps[..., 0], maps[..., 1:].sum(dim=-1)], dim=-1)
    q_self, k_self = self_qk if self_qk is not None else (None, None)
    maps = region_guidance.propagate(q_self, k_self, maps, recorder.order)
    if frames > 1:
        maps = maps.reshape(maps.shape[0] * frames, maps.shape[1] // frames, maps.shape[2])
    if entry == 0:
        recorder.add(entry, maps, grid)
    else:
        recorder.add_foreground(entry, maps, grid)


class RegionReaders(Contributor):
    """S-CFG's part in the block, attention and UNet attn1/attn2 slots: reads only, never changes an output."""

    ORDER = 10  # outermost: it reads the calls as the model makes them
    NAME = "regions"

    def present(self, transformer_options: dict) -> bool:
        return transformer_options.get(REGION_RECORDER_KEY) is not None

    def block(self, call: BlockCall) -> None:
        recorder = call.options.get(REGION_RECORDER_KEY)
        if recorder is not None:
            ctx = call.attention_context()
            ctx.parts[self] = recorder
            if not call.spec.joint:
                call.undo_after(lambda out: self._read_text(ctx, recorder, out))

    def attention(self, call, inner):
        ctx = call.ctx
        recorder = ctx.parts.get(self) if ctx is not None else None
        if recorder is not None and call.index == 1 and ctx.spec.joint:
            self._observe_joint(call, recorder)
        elif recorder is not None and not ctx.spec.joint:
            self._observe_cross(call, recorder)
        return inner(call)

    def _observe_cross(self, call, recorder) -> None:
        """A block with its text in a cross-attention module (WAN, LTXV): the block's first attention call is its
        self-attention (kept for the completion); the last marked cross-attention call of the block is its text
        (WAN i2v attends to the image context first), read when the block returns (``_read_text``)."""
        ctx, args, kwargs = call.ctx, call.args, call.kwargs
        grid = ctx.grid
        if grid is None or len(grid) not in (2, 3):
            return
        count = math.prod(int(g) for g in grid)
        heads = heads_of(args, kwargs)
        skip_reshape = kwargs.get("skip_reshape", False)
        if call.index == 1:
            if recorder.order > 0 and tokens(args[0], kwargs) == tokens(args[1], kwargs) == count:
                ctx.parts[(self, "self")] = tuple(to_bhld(a, heads, skip_reshape) for a in args[:2])
            return
        if call.options.get(CROSS_ATTENTION_KEY) and tokens(args[0], kwargs) == count:
            ctx.parts[(self, "text")] = (to_bhld(args[0], heads, skip_reshape), to_bhld(args[1], heads, skip_reshape),
                                         call.options)

    def _read_text(self, ctx, recorder, out):
        """After a WAN/LTXV block: its text map from the last marked cross-attention call (see ``_observe_cross``)."""
        text = ctx.parts.pop((self, "text"), None)
        if text is None:
            return out
        qh, kh, options = text
        frames = int(ctx.grid[0]) if len(ctx.grid) == 3 else 1
        hw = (int(ctx.grid[-2]), int(ctx.grid[-1]))
        nag = options.get(NAG_KEY)
        if nag is not None and kh.shape[2] == nag.context_tokens:
            kh = kh[:, :, :nag.positive_tokens]  # the prompt's text, never the NAG negative's
        self_qk = ctx.parts.get((self, "self"))
        with torch.no_grad():
            for entry, rows in Forward(options, qh.shape[0]).entry_rows(recorder.wants_entry):
                pair = (self_qk[0][rows], self_qk[1][rows]) if self_qk is not None else None
                _record(recorder, entry, qh[rows], kh[rows], pair, hw, frames)
        return out

    def _observe_joint(self, call, recorder) -> None:
        """A joint attention call: image queries × prompt text keys, image × image completion."""
        ctx = call.ctx
        image = ctx.image
        if image is None or ctx.grid is None or len(ctx.grid) not in (2, 3):
            return
        frames = int(ctx.grid[0]) if len(ctx.grid) == 3 else 1  # video: per-frame maps (HunyuanVideo)
        grid = (int(ctx.grid[-2]), int(ctx.grid[-1]))
        args, kwargs = call.args, call.kwargs
        q, k = args[0], args[1]
        total = tokens(q, kwargs)
        if image.stop - image.start != frames * grid[0] * grid[1]:
            return
        nag_layout = ctx.parts.get(NAG)
        if ctx.spec.image_first:
            text = slice(image.stop, total)
        elif nag_layout is not None:
            text = slice(0, nag_layout.negative_text_start)
        else:
            text = slice(0, image.start)
        if text.stop - text.start < 2:
            return
        heads = heads_of(args, kwargs)
        skip_reshape = kwargs.get("skip_reshape", False)
        qh, kh = to_bhld(q, heads, skip_reshape), to_bhld(k, heads, skip_reshape)
        with torch.no_grad():
            for entry, rows in Forward(call.options, qh.shape[0]).entry_rows(recorder.wants_entry):
                q_img = qh[rows, :, image]
                k_img = kh[rows, :, image]
                self_qk = (q_img, k_img) if recorder.order > 0 else None
                _record(recorder, entry, q_img, kh[rows, :, text], self_qk, grid, frames)

    def unet_self_attention(self, call, inner):
        recorder = call.options.get(REGION_RECORDER_KEY)
        if recorder is not None and recorder.order > 0 and _unet_layer_grid(call.options, recorder) is not None:
            recorder.pending[call.key] = (call.q, call.k)  # used by the same layer's cross-attention, right after
        return inner(call)

    def unet_cross_attention(self, call, inner):
        recorder = call.options.get(REGION_RECORDER_KEY)
        if recorder is not None:
            nag = call.options.get(NAG_KEY)
            k_text = call.k[:, :call.k.shape[1] - nag.negative_tokens] if nag is not None else call.k
            self._observe_unet_cross(call, k_text, recorder)
        return inner(call)

    def _observe_unet_cross(self, call, k_text, recorder) -> None:
        grid = _unet_layer_grid(call.options, recorder)
        if grid is None:
            return
        heads = call.options["n_heads"]
        pending = recorder.pending.pop(call.key, None)
        with torch.no_grad():
            for entry, rows in Forward(call.options, call.q.shape[0]).entry_rows(recorder.wants_entry):
                self_qk = None
                if pending is not None:
                    self_qk = tuple(to_bhld(t[rows], heads, False) for t in pending)
                _record(recorder, entry, to_bhld(call.q[rows], heads, False), to_bhld(k_text[rows], heads, False),
                        self_qk, grid)


REGIONS = RegionReaders()
REGION_EVALUATION = RegionEvaluation()


def install(model_patcher, spec: FamilySpec, dit_blocks: int, single_blocks: int = 0, unet_keys=None) -> tuple:
    """Install S-CFG's map readers on a cloned ModelPatcher; returns the observed blocks/layers.

    UNet: our attn1 (self-attention queries/keys) and attn2 (text keys) replaces on every transformer
    layer (``unet_keys``: only these). Joint DiTs: the last ``dit_blocks`` double blocks (Lumina2: main layers),
    plus the last ``single_blocks`` single blocks (Flux, Chroma: text and image in one stream), and the attention
    dispatcher.
    """
    net = diffusion_model_of(model_patcher)
    add_evaluation_hook(model_patcher, REGION_EVALUATION)
    if spec.is_unet:
        keys = list(unet_layers(net)) if unet_keys is None else list(unet_keys)
        if not keys:
            raise FamilyError("S-CFG: this UNet has no transformer layers with cross-attention.")
        installer.unet_attention(model_patcher, "attn1", keys, REGIONS)
        installer.unet_attention(model_patcher, "attn2", keys, REGIONS)
        return tuple(keys)
    layout = block_layout(model_patcher, spec)
    if spec.nag == "cross":  # WAN, LTXV: the text map comes from the blocks' cross-attention modules
        for name, _module in net.named_modules():
            if name.rsplit(".", 1)[-1] == spec.cross_attention:
                installer.module_patch(model_patcher, f"diffusion_model.{name}", CrossAttentionForward)
    group = "single" if spec.block_hook == "layers" else "double"  # Lumina2: one joint stream per layer
    count = layout.dit_blocks.get(group, 0)
    if count == 0:
        raise FamilyError(f"S-CFG: this {spec.name} model has no joint (double) blocks.")
    chosen = [(group, i) for i in range(max(0, count - dit_blocks), count)]
    if single_blocks:
        singles = layout.dit_blocks.get("single", 0) if group == "double" else 0
        if singles == 0:
            raise FamilyError(f"S-CFG: this {spec.name} model has no single blocks after its joint blocks; set "
                              f"single_blocks to 0.")
        chosen += [("single", i) for i in range(max(0, singles - single_blocks), singles)]
    installer.dit_blocks(model_patcher, spec, layout, chosen, REGIONS)
    installer.attention(model_patcher, REGIONS)
    installer.latent_shape(model_patcher)
    return tuple(chosen)
