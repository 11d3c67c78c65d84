"""NAG (Normalized Attention Guidance): the NAG negative's text as extra context tokens, attention split per prompt.

Not a plan term: the NAG node clones the MODEL and installs this contributor. ``NagInput`` (an APPLY_MODEL
wrapper) appends the NAG negative's text tokens to the context of every row when the call contains the
prompt's rows (inside the window), so the model's own text layers process them (HunyuanVideo's mixing
refiner runs once per text: ``TextRefinerPerPrompt``). The attention slots split every text attention into
the prompt's view (all rows; identical to the model without the tokens, perturbations included) and the
negative's view (the prompt's rows only) and combine them with ``attention_ops.nag_combine``: UNet ``attn2``
replaces; object-patch markers (``CrossAttentionForward``) on the WAN/LTXV/Cosmos Predict2 cross-attention
modules, read by the attention dispatcher; the block hooks and the dispatcher for joint attention (Flux,
Chroma, SD3, Qwen-Image, HunyuanVideo). CFG's uncond, ICG and perturbation branches get no NAG (as the
official code). A call where NAG never reached an attention raises ``NagNotApplied``. The negative's own
pooled modulation (Flux, SD3, HunyuanVideo) is ``nag_modulation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...guiders import attention_ops
from ...guiders.schedules import Window
from ..runtime import install as installer
from ..runtime import lumina
from ..runtime.attention_layout import attention_view, from_token_major, heads_of, token_major, tokens
from ..runtime.blocks import block_layout, unet_layers
from ..runtime.engine import check_window_reachable
from ..runtime.families import FamilyError, FamilySpec, diffusion_model_of
from ..runtime.rows import Forward, current_options, published, sigma_list, sigma_progress, sigma_value
from ..runtime.slots import BlockCall, Contributor, ModulePatch

NAG_KEY = "guidance_kit_nag"  # transformer_options: the NagForward of this model call
NAG_WRAPPER_KEY = "guidance_kit_nag"  # APPLY_MODEL wrapper key of NagInput
CROSS_ATTENTION_KEY = "guidance_kit_cross_attention"  # set inside a marked text cross-attention module
# forwards whose text cross-attention calls are marked: NAG's, and those where S-CFG reads maps
# (contributors/regions.REGION_RECORDER_KEY; that module imports this one)
MARKED_FOR = (NAG_KEY, "guidance_kit_scfg")


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


def current_nag() -> NagForward | None:
    """The NagForward of the model call running now (for patches that see no transformer_options)."""
    return current_options().get(NAG_KEY)


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
        forward = Forward(to, x.shape[0])
        rows = None
        if isinstance(to, dict) and not self.settings.is_identity:
            rows = forward.prompt_rows()
        if rows is None or not self._in_window(to, executor.class_obj):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        owner, spec = self.settings.owner, self.settings.spec
        if not torch.is_tensor(c_crossattn) or c_crossattn.ndim != 3:
            raise FamilyError(f"{owner}: this {spec.name} call has no text context tokens to add the NAG negative to.")
        if kwargs.get("txt_byt5") is not None:
            raise FamilyError(f"{owner}: the ByT5 glyph tokens of HunyuanImage 2.1 / HunyuanVideo 1.5 (quoted text in "
                              f"the prompt) follow the text tokens, which NAG does not handle; remove the quoted glyph "
                              f"text, or use the negative prompt with cfg > 1 on this model.")
        chunks, per_chunk = len(forward.chunks), forward.chunk_size
        negative = self._negative_context(c_crossattn, per_chunk, chunks)
        kwargs = self._with_text_mask(kwargs, c_crossattn.shape[1], negative.shape[1], per_chunk, chunks)
        if spec.block_hook == "layers" and isinstance(kwargs.get("num_tokens"), int):
            # Lumina2 (ComfyUI 0.3.x) keeps only the first num_tokens caption tokens when no mask is given
            kwargs = {**kwargs, "num_tokens": kwargs["num_tokens"] + negative.shape[1]}
        nag = NagForward(self.settings, rows, x.shape[0], c_crossattn.shape[1], negative.shape[1])
        if self.settings.modulation is not None:
            nag.modulation = self.settings.modulation.prepare(executor.class_obj, x, kwargs, nag, per_chunk)
        with published(to, {NAG_KEY: nag}):
            out = executor(x, t, c_concat, torch.cat([c_crossattn, negative], dim=1), control, transformer_options,
                           **kwargs)
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
        sigma = sigma_value(to.get("sigmas"))
        if window.contains(sigma_progress(model.model_sampling, sigma), sigma):
            return True
        sample_sigmas = to.get("sample_sigmas")
        if sample_sigmas is not None and (self._checked is None or self._checked is not sample_sigmas):
            self._checked = sample_sigmas  # once per sampler call
            sigmas = sigma_list(sample_sigmas)
            try:
                check_window_reachable(self.settings.owner, window, sigmas, model.model_sampling)
            except RuntimeError as e:
                raise FamilyError(str(e)) from None
        return False

    def _negative_context(self, context: torch.Tensor, per_chunk: int, chunks: int) -> torch.Tensor:
        import comfy.utils

        negative = self.settings.context
        if negative.shape[-1] != context.shape[-1]:
            raise FamilyError(f"{self.settings.owner}: the NAG negative has {negative.shape[-1]} channels per token, "
                              f"the prompt {context.shape[-1]}. Encode the NAG negative with the same text encoder "
                              f"(CLIP loader) as the prompt.")
        negative = comfy.utils.repeat_to_batch_size(negative, per_chunk).repeat(chunks, 1, 1)
        return negative.to(device=context.device, dtype=context.dtype)

    def _with_text_mask(self, kwargs: dict, positive_tokens: int, negative_tokens: int, per_chunk: int,
                        chunks: int) -> dict:
        import comfy.utils

        mask = kwargs.get("attention_mask")
        if mask is None:
            return kwargs
        owner, spec = self.settings.owner, self.settings.spec
        if spec.block_hook == "layers":  # Lumina2 0.3.x keeps each row's first sum(mask) caption tokens
            raise FamilyError(f"{owner}: this {spec.name} prompt carries a padding mask, which ComfyUI applies by "
                              f"keeping the first unmasked-count caption tokens, so the NAG negative's tokens would "
                              f"be cut; encode the prompt without padding, or remove the NAG node.")
        if spec.text_mask != "padding":
            raise FamilyError(f"{owner}: {spec.name} conditioning with an attention mask (regional prompting) "
                              f"cannot be combined with NAG; remove the mask or the NAG node.")
        if not (torch.is_tensor(mask) and mask.ndim == 2 and mask.shape[1] == positive_tokens):
            raise FamilyError(f"{owner}: the prompt's attention mask {tuple(getattr(mask, 'shape', ()))} is not one "
                              f"entry per text token ({positive_tokens}); NAG cannot extend it.")
        negative = self.settings.mask
        if negative is None:
            negative = torch.ones(1, negative_tokens, dtype=mask.dtype)
        negative = comfy.utils.repeat_to_batch_size(negative, per_chunk).repeat(chunks, 1)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.cat([mask, negative.to(device=mask.device, dtype=mask.dtype)], dim=1)
        return kwargs


class CrossAttentionForward(ModulePatch):
    """Object patch of a text cross-attention module's ``forward`` (WAN, LTXV, Cosmos Predict2).

    In a NAG forward (or one where S-CFG reads maps) it marks the module's attention calls
    (``CROSS_ATTENTION_KEY``) so the attention dispatcher applies NAG to the call whose keys are the text
    tokens (S-CFG reads its text map there); the module's own forward runs unchanged. Outside those forwards
    it only calls that forward.
    """

    def __call__(self, *args, **kwargs):
        to = kwargs.get("transformer_options")
        if isinstance(to, dict) and any(key in to for key in MARKED_FOR):
            kwargs["transformer_options"] = {**to, CROSS_ATTENTION_KEY: True}
        return self.original(*args, **kwargs)


class TextRefinerPerPrompt(ModulePatch):
    """Object patch of HunyuanVideo's text refiner ``txt_in.forward``.

    The refiner mixes the text tokens of a row (self-attention, a mean-pooled conditioning), so in
    a NAG forward the prompt's tokens and the NAG negative's are refined by two calls of the
    refiner's own forward, each exactly as it would run for that text alone.
    """

    def __call__(self, x, timesteps, mask=None, transformer_options=None, **kwargs):
        options = transformer_options if transformer_options is not None else {}
        nag: NagForward | None = options.get(NAG_KEY) if isinstance(options, dict) else None
        if nag is None:
            return self.original(x, timesteps, mask, transformer_options=options, **kwargs)
        split = x.shape[1] - nag.negative_tokens
        parts = []
        for text in (slice(0, split), slice(split, x.shape[1])):
            part_mask = mask[:, text] if torch.is_tensor(mask) else mask
            parts.append(self.original(x[:, text], timesteps, part_mask, transformer_options=options, **kwargs))
        return torch.cat(parts, dim=1)


class NagAttention(Contributor):
    """NAG's part in the block, attention and UNet attn2 slots."""

    ORDER = 20  # around the perturbations: the prompt's view runs them
    NAME = "nag"

    def present(self, transformer_options: dict) -> bool:
        return transformer_options.get(NAG_KEY) is not None

    def block(self, call: BlockCall) -> None:
        """A joint block: where the prompt's text, the NAG negative's text and the image tokens sit in its
        attention call (the negative's tokens are the last of the text stream)."""
        nag: NagForward | None = call.options.get(NAG_KEY)
        if nag is None:
            return
        if call.key[0] == "double":
            text, image = call.args["txt"].shape[1], call.args["img"].shape[1]
        else:
            text = call.text_length
            if text is None:
                raise RuntimeError(f"{nag.settings.owner}: the text length of {call.spec.name} single blocks is "
                                   f"unknown (the last double block's hook did not run)")
            image = call.args["img"].shape[1] - text
        layout = nag.joint_layout(call.key, text, image, call.spec.image_first)
        self._align_negative_positions(call, nag, layout)
        call.attention_context().parts[self] = layout

    @staticmethod
    def _align_negative_positions(call: BlockCall, nag: NagForward, layout: JointNagLayout) -> None:
        """Give the NAG negative's text tokens the rotary positions of a prompt of their own.

        Families whose text tokens carry distinct positions (Qwen-Image) number the appended tokens
        after the prompt's; the negative must see the image from the positions it would have alone.
        """
        dim = call.spec.text_pe_token_dim
        pe = call.args.get("pe")
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
        call.set("pe", cached[1])

    def attention(self, call, inner):
        nag: NagForward | None = call.options.get(NAG_KEY)
        if nag is None:
            return inner(call)
        layout = call.ctx.parts.get(self) if call.ctx is not None else None
        if layout is not None and call.index == 1:
            return self._joint(nag, layout, call, inner)
        if call.options.get(CROSS_ATTENTION_KEY) and tokens(call.args[1], call.kwargs) == nag.context_tokens:
            return self._cross(nag, call, inner)
        return inner(call)

    @staticmethod
    def _cross(nag: NagForward, call, inner):
        """Text cross-attention: Z⁺ against the prompt's keys for every row, Z⁻ against the NAG
        negative's keys for the prompt's rows, NAG-combined on those rows."""
        args, kwargs = call.args, call.kwargs
        total = tokens(args[1], kwargs)
        split = total - nag.negative_tokens
        z_positive = inner(call.view(*attention_view(args, kwargs, None, torch.arange(0, split), None, total)))
        z_negative = call.plain(call.view(*attention_view(args, kwargs, None, torch.arange(split, total),
                                                          nag.row_subset, total)))
        skip_output_reshape = kwargs.get("skip_output_reshape", False)
        positive_tokens = token_major(z_positive, skip_output_reshape)
        negative_tokens = token_major(z_negative, skip_output_reshape)
        if nag.row_subset is None:
            out = nag.combine(positive_tokens, negative_tokens)
        else:
            out = positive_tokens.clone()
            rows = nag.rows.to(out.device)
            out[rows] = nag.combine(positive_tokens[rows], negative_tokens)
        return from_token_major(out, skip_output_reshape, heads_of(args, kwargs))

    @staticmethod
    def _joint(nag: NagForward, layout: JointNagLayout, call, inner):
        """Joint attention: every row attends over [prompt text, image] (the model without the NAG
        tokens, perturbations included); the prompt's rows also over [NAG negative text, image],
        which gives the negative text tokens their output and the image tokens Z⁻."""
        args, kwargs = call.args, call.kwargs
        total = tokens(args[0], kwargs)
        if total != layout.total:
            raise RuntimeError(f"{nag.settings.owner}: the joint attention of {layout.block} has {total} tokens, "
                               f"expected {layout.total} (text + image); this model version lays out its tokens "
                               f"differently. Please report it.")
        positive = attention_view(args, kwargs, layout.positive_view, layout.positive_view, None, total)
        z_positive = inner(call.view(*positive, image=layout.image_in_positive))
        negative = attention_view(args, kwargs, layout.negative_view, layout.negative_view, nag.row_subset, total)
        z_negative = call.plain(call.view(*negative))
        skip_output_reshape = kwargs.get("skip_output_reshape", False)
        positive_tokens = token_major(z_positive, skip_output_reshape)
        negative_tokens = token_major(z_negative, skip_output_reshape)
        # rows without NAG give the negative text tokens a zero attention output: those tokens never
        # reach their image tokens, which attend over the prompt's text only
        out = positive_tokens.new_zeros((positive_tokens.shape[0], total, positive_tokens.shape[-1]))
        device = out.device
        out[:, layout.positive_view.to(device)] = positive_tokens
        rows = nag.rows.to(device)[:, None]
        out[rows, layout.negative_text.to(device)[None]] = negative_tokens[:, layout.negative_text_in_negative]
        out[rows, layout.image.to(device)[None]] = nag.combine(positive_tokens[rows[:, 0], layout.image_in_positive],
                                                               negative_tokens[:, layout.image_in_negative])
        return from_token_major(out, skip_output_reshape, heads_of(args, kwargs))

    def unet_cross_attention(self, call, inner):
        """With NAG in the forward, k/v hold the prompt's context followed by the NAG negative's tokens:
        every row attends over the prompt's tokens (Z⁺, the unmodified cross-attention), the prompt's
        rows also over the negative's (Z⁻), and those rows get ``nag_combine(Z⁺, Z⁻)``. A previous
        occupant (e.g. IP-Adapter's attn2 replace) computes both."""
        nag: NagForward | None = call.options.get(NAG_KEY)
        if nag is None:
            return inner(call)
        q, k, v = call.q, call.k, call.v
        split = k.shape[1] - nag.negative_tokens
        z_positive = inner(call.with_qkv(q, k[:, :split].contiguous(), v[:, :split].contiguous()))
        rows = nag.row_subset
        if rows is None:
            z_negative = call.plain(call.with_qkv(q, k[:, split:].contiguous(), v[:, split:].contiguous()))
            return nag.combine(z_positive, z_negative)
        rows = rows.to(q.device)
        z_negative = call.plain(call.with_qkv(q[rows], k[rows, split:], v[rows, split:]))
        out = z_positive.clone()
        out[rows] = nag.combine(z_positive[rows], z_negative)
        return out


NAG = NagAttention()


def install(model_patcher, spec: FamilySpec, settings: NagSettings) -> None:
    """Install NAG on a cloned ModelPatcher: its input wrapper and the family's attention slots."""
    import comfy.patcher_extension

    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if model_patcher.get_wrappers(apply_model, NAG_WRAPPER_KEY):
        raise FamilyError(f"{settings.owner}: this model already has NAG (from an earlier node in the chain). Use one "
                          f"NAG node; to change its settings, edit that node.")
    net = diffusion_model_of(model_patcher)
    if spec.nag == "attn2":
        installer.unet_attention(model_patcher, "attn2", list(unet_layers(net)), NAG)
        if not model_patcher.model_options["transformer_options"]["patches_replace"]["attn2"]:
            raise FamilyError(f"{settings.owner}: this UNet has no transformer layers with cross-attention.")
    elif spec.nag == "joint":
        layout = block_layout(model_patcher, spec)
        keys = [(group, index) for group, _attr in spec.groups for index in range(layout.dit_blocks.get(group, 0))]
        installer.dit_blocks(model_patcher, spec, layout, keys, NAG)
        installer.attention(model_patcher, NAG)
        if spec.text_refiner:
            installer.module_patch(model_patcher, f"diffusion_model.{spec.text_refiner}", TextRefinerPerPrompt)
        if spec.block_hook == "layers":
            lumina.nag_captions(model_patcher, spec)
    elif spec.nag == "cross":
        found = 0
        for name, _module in net.named_modules():
            if name.rsplit(".", 1)[-1] == spec.cross_attention:
                installer.module_patch(model_patcher, f"diffusion_model.{name}", CrossAttentionForward)
                found += 1
        if not found:
            raise FamilyError(f"{settings.owner}: no '{spec.cross_attention}' modules in this {spec.name} model; this "
                              f"ComfyUI version builds it differently. Please report it.")
        installer.attention(model_patcher, NAG)
    else:
        raise FamilyError(f"{settings.owner}: NAG has no attention hook for {spec.name}.")
    model_patcher.add_wrapper_with_key(apply_model, NAG_WRAPPER_KEY, NagInput(settings))
