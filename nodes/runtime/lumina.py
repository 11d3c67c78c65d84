"""Lumina2 / NextDiT (Lumina Image 2.0, Z-Image, Z-Image-Turbo): the block slot without a DiT block-replace.

NextDiT calls its main ``layers`` directly (``layer(x, mask, freqs_cis, adaln_input, transformer_options=...)``;
newer ComfyUI adds ``timestep_zero_index`` and sets ``block_index`` / ``block_type`` in transformer_options,
which nothing here relies on). Each hooked layer gets an object patch of its ``forward``
(``LayerForward``) that presents the call to the contributors exactly as a ``DitBlockHook`` does for a
joint single block: one token stream ``[caption, image]``, the image span published per call
(``TEXT_LENGTH_KEY``, ``IMAGE_TOKENS_KEY``: Z-Image pads the image tokens to a multiple of 32 with pad tokens
after them). Every attention call goes through ComfyUI's masked attention and the override, so the
attention dispatcher sees it (newer ComfyUI hands the override plain tensors, unpacking its
``AttentionTensorContainer``).

NAG: the negative's caption tokens follow the prompt's in the caption stream. Three patches keep the
prompt's view exactly the model without them:

* ``CaptionPadding`` (newer ComfyUI, Z-Image's ``pad_tokens_multiple``): the prompt's caption gets its own
  pad tokens before the negative's, so both captions are padded as each would be alone;
* ``RefinerPerPrompt``: the caption refiner (self-attention over caption tokens) runs once per caption;
* ``LayerForward`` rotates the rotary positions of every token after the prompt's caption back by the
  negative caption's length (``shift_positions``): the image sits at the position it has after the prompt
  alone, and the negative's tokens sit before the image as they would alone.
"""

from __future__ import annotations

import math

import torch

from .blocks import image_grid
from .families import FamilyError, FamilySpec
from .rows import current_options
from .slots import IMAGE_TOKENS_KEY, LATENT_SHAPE_KEY, TEXT_LENGTH_KEY, DitBlockHook, ModulePatch, Slot

NAG_KEY = "guidance_kit_nag"  # = contributors.nag.NAG_KEY (the runtime does not import contributors)
CAPTION_PADDED = "lumina_caption_padded"  # NagForward.layouts entry: the captions were padded per prompt


def padded_length(tokens: int, multiple: int | None) -> int:
    """The caption or image length after Z-Image's padding to ``multiple`` (None: no padding)."""
    return tokens if not multiple else tokens + (-tokens) % multiple


def image_tokens(spec: FamilySpec, options: dict) -> int:
    """The latent's own image tokens in this forward (its patch grid)."""
    grid = image_grid(spec, options.get(LATENT_SHAPE_KEY))
    if grid is None:
        raise RuntimeError(f"Guidance Kit ({spec.name}): the latent shape of this forward is unknown (the pack's "
                           f"APPLY_MODEL wrapper did not run)")
    return math.prod(grid)


def caption_length(spec: FamilySpec, x: torch.Tensor, mask, image: int, multiple: int | None) -> int:
    """Tokens before the image in a main layer's stream ``[caption, image (+ pad tokens)]``.

    ComfyUI 0.3.x puts each row's image right after that row's caption; with a padding mask (prompts
    encoded with padding) rows may differ, and one span cannot serve them all.
    """
    caption = x.shape[1] - padded_length(image, multiple)
    if caption < 0:
        raise RuntimeError(f"Guidance Kit ({spec.name}): a layer carries {x.shape[1]} tokens, fewer than the "
                           f"latent's {image} image tokens; this ComfyUI version lays out NextDiT differently. "
                           f"Please report it.")
    if torch.is_tensor(mask) and mask.ndim >= 2:
        masked = (mask.reshape(mask.shape[0], -1) < 0).sum(dim=1)
        if bool((masked != masked[0]).any()):
            raise FamilyError(f"Guidance Kit ({spec.name}): the captions in this batch have different padding "
                              f"lengths, so the image tokens start at a different place in each row. Encode the "
                              f"prompts without padding (one prompt per CLIP Text Encode).")
    return caption


def _is_identity(freqs: torch.Tensor) -> torch.Tensor:
    """[B, L] whether each token's rotary table is the identity (position 0 on every axis: padding)."""
    eye = torch.eye(2, dtype=freqs.dtype, device=freqs.device)
    return (freqs == eye).flatten(2).all(dim=-1)


def shift_positions(freqs: torch.Tensor, start: int, shift: int) -> torch.Tensor:
    """Rotary tables [B, L, 1, D/2, 2, 2] with the tokens from ``start`` on moved back by ``shift`` caption
    positions. Caption tokens differ only on the first (sequence) axis, so ``R(t_0)·R(t_shift)ᵀ`` is the rotation
    by −shift on that axis and the identity on the others; rotations compose by multiplication. Tokens whose
    table is the identity (Z-Image's image pad tokens at position 0) keep it."""
    table = freqs.float()
    back = table[:, 0] @ table[:, shift].transpose(-1, -2)  # [B, 1, D/2, 2, 2]
    moved = table[:, start:] @ back[:, None]
    keep = _is_identity(freqs[:, start:])[..., None, None, None, None]
    out = table.clone()
    out[:, start:] = torch.where(keep, table[:, start:], moved)
    return out.to(freqs.dtype)


class LayerForward(Slot, ModulePatch):
    """Object patch of one NextDiT main layer's ``forward``: the contributors see it as a joint single block."""

    def __init__(self, module, spec: FamilySpec, key: tuple[str, int], pad_multiple: int | None, previous=None,
                 contributors: tuple = ()):
        ModulePatch.__init__(self, module, previous)
        self.spec = spec
        self.key = key
        self.pad_multiple = pad_multiple
        self.contributors = contributors

    def __call__(self, x, x_mask, freqs_cis, adaln_input=None, *args, transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        if not any(c.present(to) for c in self.contributors):
            return self.original(x, x_mask, freqs_cis, adaln_input, *args, transformer_options=to, **kwargs)
        image = image_tokens(self.spec, to)
        caption = caption_length(self.spec, x, x_mask, image, self.pad_multiple)
        to[TEXT_LENGTH_KEY] = caption
        to[IMAGE_TOKENS_KEY] = image
        nag = to.get(NAG_KEY)
        if nag is not None:
            freqs_cis = self._nag_positions(nag, freqs_cis, caption, kwargs)

        def run(block_args: dict) -> dict:
            return {"img": self.original(block_args["img"], x_mask, block_args["pe"], block_args["vec"], *args,
                                         transformer_options=block_args["transformer_options"], **kwargs)}

        hook = DitBlockHook(self.spec, self.key, contributors=self.contributors)
        block_args = {"img": x, "pe": freqs_cis, "vec": adaln_input, "transformer_options": to}
        return hook(block_args, {"original_block": run})["img"]

    def _nag_positions(self, nag, freqs: torch.Tensor, caption: int, kwargs: dict) -> torch.Tensor:
        if kwargs.get("timestep_zero_index") is not None:
            raise FamilyError(f"{nag.settings.owner}: NAG on {self.spec.name} with reference images (Z-Image Omni "
                              f"/ edit) is not supported: the reference tokens sit between the captions and the "
                              f"image. Use the negative prompt with cfg > 1 on such a model.")
        if caption != nag.positive_tokens + nag.negative_tokens:
            raise RuntimeError(f"{nag.settings.owner}: {self.spec.name} layer {self.key[1]} carries {caption} caption "
                               f"tokens, not the prompt's and the NAG negative's together ({nag.positive_tokens} + "
                               f"{nag.negative_tokens}); this ComfyUI version builds the caption differently. "
                               f"Please report it.")
        cached = nag.aligned_positions.get(id(freqs))
        if cached is None or cached[0] is not freqs:
            cached = (freqs, shift_positions(freqs, nag.positive_tokens, nag.negative_tokens))
            nag.aligned_positions[id(freqs)] = cached
        return cached[1]


class RefinerPerPrompt(ModulePatch):
    """Object patch of a caption-refiner layer's ``forward``: in a NAG forward, the prompt's caption and the
    negative's are refined by two calls, each exactly as that caption alone."""

    def __call__(self, x, x_mask, freqs_cis, *args, transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        nag = to.get(NAG_KEY)
        if nag is None:
            return self.original(x, x_mask, freqs_cis, *args, transformer_options=to, **kwargs)
        split = nag.positive_tokens
        parts = []
        for span in (slice(0, split), slice(split, x.shape[1])):
            mask = x_mask[:, span] if torch.is_tensor(x_mask) and x_mask.ndim == 2 else x_mask
            parts.append(self.original(x[:, span], mask, freqs_cis[:, span], *args, transformer_options=to, **kwargs))
        return torch.cat(parts, dim=1)


class CaptionPadding(ModulePatch):
    """Object patch of ``cap_embedder.forward`` (Z-Image: captions padded to ``pad_tokens_multiple`` with a learned
    pad token): in a NAG forward the prompt's caption gets the pad tokens it has alone before the negative's
    caption follows; the model then pads the negative's as it would alone. The NagForward's caption lengths
    become the padded ones."""

    def __init__(self, module, net, previous=None):
        ModulePatch.__init__(self, module, previous)
        self.net = net

    def __call__(self, feats, *args, **kwargs):
        out = self.original(feats, *args, **kwargs)
        nag = current_options().get(NAG_KEY)
        multiple = getattr(self.net, "pad_tokens_multiple", None)
        if nag is None or not multiple or nag.layouts.get(CAPTION_PADDED) or out.shape[1] != nag.context_tokens:
            return out
        nag.layouts[CAPTION_PADDED] = True
        prompt = nag.positive_tokens
        extra = padded_length(prompt, multiple) - prompt
        if extra:
            pad = self.net.cap_pad_token.to(device=out.device, dtype=out.dtype)
            out = torch.cat([out[:, :prompt], pad.unsqueeze(0).expand(out.shape[0], extra, -1), out[:, prompt:]],
                            dim=1)
        nag.positive_tokens = prompt + extra
        nag.negative_tokens = padded_length(nag.negative_tokens, multiple)
        return out


def layers(model_patcher, spec: FamilySpec, keys, contributor) -> None:
    """Register ``contributor`` on the layer patches of ``keys`` ((group, index)); publishes the latent shape."""
    from . import install as installer

    net = model_patcher.model.diffusion_model
    attributes = dict(spec.groups)
    pad_multiple = getattr(net, "pad_tokens_multiple", None)
    for group, index in keys:
        path = f"diffusion_model.{attributes[group]}.{index}"
        patch = installer.module_patch(model_patcher, path, LayerForward, spec, (group, index), pad_multiple)
        model_patcher.add_object_patch(f"{path}.{LayerForward.METHOD}", patch.with_contributor(contributor))
    installer.latent_shape(model_patcher)


def nag_captions(model_patcher, spec: FamilySpec) -> None:
    """NAG's caption patches: the refiner once per caption; Z-Image's caption padding per caption."""
    from . import install as installer

    net = model_patcher.model.diffusion_model
    refiner = getattr(net, "context_refiner", None)
    if refiner is None:
        raise FamilyError(f"NAG: this {spec.name} model has no 'context_refiner'; this ComfyUI version builds it "
                          f"differently. Please report it.")
    for index in range(len(refiner)):
        installer.module_patch(model_patcher, f"diffusion_model.context_refiner.{index}", RefinerPerPrompt)
    if getattr(net, "pad_tokens_multiple", None):
        installer.module_patch(model_patcher, "diffusion_model.cap_embedder", CaptionPadding, net)
