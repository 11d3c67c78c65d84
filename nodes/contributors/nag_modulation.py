"""NAG on Flux, SD3/3.5 and HunyuanVideo: the NAG negative's text tokens modulated with its own pooled vector.

On these DiTs every block's adaptive norm (shift, scale, gate) comes from one modulation vector per row,
``vec = time + guidance + embed(pooled text)``. The pack appends the NAG negative's text tokens to the
prompt's rows (``nag.NagInput``), so without this module they are modulated with the *prompt's* pooled
vector. The official code modulates them with the *negative's* own:

* ChenDarYen/ComfyUI-NAG ``flux/model.py`` (``y`` concatenated with ``nag_negative_y``, the NAG negative
  conditioning's ``pooled_output``) and ``flux/layers.py`` ``NAGDoubleStreamBlock`` (``img_mod(vec[:-origin_bsz])``
  for the image stream, ``txt_mod(vec)`` for the text streams: the negative's rows use its own vec);
  ``hunyuan_video/model.py`` the same with Flux's blocks; ``sd3/mmdit.py`` (``_nag_block_mixing``: the
  context block gets the negative's ``c``, the image block the prompt's);
* the official diffusers Flux pipeline (ChenDarYen/Normalized-Attention-Guidance ``nag/pipeline_flux_nag.py``
  with ``TruncAdaLayerNormZero``): the same. Its SD3 pipeline (``nag/pipeline_sd3_nag.py``) is the one
  exception: it builds the NAG rows with the prompt's pooled vector (the negative's is computed but unused).

This module gives the negative's tokens ``vec⁻ = vec + embed(pooled⁻) − embed(pooled)`` (exactly the
negative's own modulation vector; time and guidance are shared) inside the same forward, without
re-implementing a block:

* Flux, HunyuanVideo: object patches of ``txt_mod`` (double blocks) and ``modulation`` (single blocks),
  ComfyUI's ``Modulation`` modules. They return per-token shift/scale/gate tensors: the negative's text
  positions get the modulation of vec⁻, every other token (all of the image tokens, the prompt's text,
  rows without NAG) exactly the block's own. ``img_mod`` is untouched (the image stream keeps the
  prompt's modulation, as the official code).
* SD3/3.5: object patches of each joint block's ``context_block.pre_attention`` / ``post_attention``: the
  context block runs its own code twice, on the prompt's text tokens with ``c`` and on the negative's
  with ``c⁻`` (per-token operations only), and the results are joined.

One remaining difference to ComfyUI-NAG in Flux/HunyuanVideo single blocks: it keeps a separate copy of
the image tokens for the negative (modulated with vec⁻ there), while the pack's Z⁻ uses the prompt's
image queries and keys (the paper's formulation; ``web/docs/GuidanceKit_NAG.md`` gives the measured
size of both differences).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..runtime import install as installer
from ..runtime.families import TABLE, FamilyError, PooledSite, diffusion_model_of
from ..runtime.slots import ModulePatch
from .nag import current_nag

log = logging.getLogger("guidance_kit")

SITES: dict[str, PooledSite] = {s.name: s.nag_pooled for s in TABLE.values() if s.nag_pooled is not None}


@dataclass(eq=False)
class NegativeModulation:
    """Per model call: vec⁻ − vec for the NAG rows (``delta`` [rows, D]) and whether a block used it."""

    delta: torch.Tensor
    applied: int = 0
    skipped: int = 0  # calls that could not take per-token modulation (HunyuanVideo I2V token replace)


@dataclass(eq=False)
class OwnPooledModulation:
    """NagSettings.modulation: prepares ``NegativeModulation`` for each NAG model call."""

    site: PooledSite
    pooled: torch.Tensor  # the NAG negative's pooled vector [b, P]
    warned: set = field(default_factory=set)

    def prepare(self, model, x: torch.Tensor, kwargs: dict, nag, per_chunk: int) -> NegativeModulation | None:
        net = model.diffusion_model
        embedder = getattr(net, self.site.embedder, None)
        if embedder is None:  # e.g. HunyuanVideo 1.5 / HunyuanImage: no pooled vector in the modulation
            return None
        y = kwargs.get("y")
        dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
        width = getattr(getattr(net, "params", None), self.site.width, None) if self.site.width else None
        rows = nag.rows.to(x.device)
        if torch.is_tensor(y):
            prompt = y.index_select(0, rows)
        else:
            prompt = torch.zeros((rows.numel(), self.pooled.shape[-1]), device=x.device)
        negative = _per_row(self.pooled, prompt.shape[0], per_chunk)
        if negative.shape[-1] != prompt.shape[-1]:
            raise FamilyError(f"{nag.settings.owner}: the NAG negative's pooled vector has {negative.shape[-1]} "
                                    f"channels, the prompt's {prompt.shape[-1]}. Encode the NAG negative with the "
                                    f"same text encoder (CLIP loader) as the prompt.")
        if width is not None:
            prompt, negative = prompt[:, :width], negative[:, :width]
        prompt = prompt.to(device=x.device, dtype=dtype)
        negative = negative.to(device=x.device, dtype=dtype)
        return NegativeModulation(embedder(negative) - embedder(prompt))

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message)


def _per_row(pooled: torch.Tensor, rows: int, per_chunk: int) -> torch.Tensor:
    """The negative's pooled vector for each NAG row: repeated to the latent batch, once per prompt chunk
    (the order of ``Forward.prompt_rows`` and of the negative's tokens in ``NagInput``)."""
    import comfy.utils

    return comfy.utils.repeat_to_batch_size(pooled, per_chunk).repeat(max(1, rows // per_chunk), 1)


def for_family(spec, pooled: torch.Tensor | None, owner: str) -> OwnPooledModulation | None:
    """The NAG node's modulation helper for this family (None: the family has no pooled modulation)."""
    site = spec.nag_pooled
    if site is None:
        return None
    if pooled is None:
        log.warning(f"{owner}: the NAG negative has no pooled vector (pooled_output); on {spec.name} its text "
                    f"tokens are modulated with the prompt's pooled vector instead of its own.")
        return None
    return OwnPooledModulation(site, pooled.detach())


# ------------------------------------------------------------------------------------------------
# Flux / HunyuanVideo: per-token modulation from ComfyUI's Modulation modules
# ------------------------------------------------------------------------------------------------

def _negative_modulation(nag) -> NegativeModulation | None:
    return getattr(nag, "modulation", None) if nag is not None else None


def _per_token(out, negative, rows: torch.Tensor, positions: torch.Tensor, length: int):
    """A ModulationOut whose tensors are [B, length, C]: ``negative``'s values at (rows, positions)."""
    def place(value: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        full = value.expand(value.shape[0], length, value.shape[-1]).clone()
        full[rows[:, None], positions[None]] = replacement.expand(replacement.shape[0], positions.numel(),
                                                                  replacement.shape[-1]).to(full.dtype)
        return full

    return type(out)(shift=place(out.shift, negative.shift), scale=place(out.scale, negative.scale),
                     gate=place(out.gate, negative.gate))


class TokenModulation(ModulePatch):
    """Object patch of a Flux-layers ``Modulation.forward``: in a NAG call with the negative's own
    modulation, the NAG negative's text positions get the modulation of vec⁻ (``stream``: "text" for a
    double block's ``txt_mod``, "joint" for a single block's ``modulation``)."""

    def __init__(self, module, stream: str, site: OwnPooledModulation, previous=None):
        super().__init__(module, previous)
        self.stream = stream
        self.site = site

    def __call__(self, vec):
        forward = self.original
        nag = current_nag()
        negative = _negative_modulation(nag)
        if negative is None or nag.current is None:
            return forward(vec)
        if not (torch.is_tensor(vec) and vec.ndim == 2):
            negative.skipped += 1
            self.site.warn_once("token-replace", f"{nag.settings.owner}: this {nag.settings.spec.name} call modulates "
                                                 f"image frames separately (image-to-video token replace); the NAG "
                                                 f"negative's text keeps the prompt's pooled vector there.")
            return forward(vec)
        rows = nag.rows.to(vec.device)
        first, second = forward(vec)
        negative_first, negative_second = forward(vec.index_select(0, rows) + negative.delta.to(vec.dtype))
        layout = nag.current
        if self.stream == "text":
            length = layout.total - layout.image.numel()
            positions = torch.arange(length - nag.negative_tokens, length, device=vec.device)
        else:
            length = layout.total
            positions = layout.negative_text.to(vec.device)
        negative.applied += 1
        return (_per_token(first, negative_first, rows, positions, length),
                _per_token(second, negative_second, rows, positions, length) if second is not None else None)


# ------------------------------------------------------------------------------------------------
# SD3/3.5: the context block run once per text, with its own modulation vector
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _SplitIntermediates:
    """post_attention's inputs of the prompt's tokens (``prompt``) and the negative's (``negative``)."""

    split: int
    prompt: tuple
    negative: tuple


class ContextPreAttention(ModulePatch):
    """Object patch of an MMDiT ``context_block.pre_attention``: the prompt's text tokens (and registers)
    with ``c``, the NAG negative's with ``c⁻`` on the NAG rows."""

    METHOD = "pre_attention"

    def __call__(self, x, c):
        pre_attention = self.original
        nag = current_nag()
        negative = _negative_modulation(nag)
        if negative is None or x.shape[1] <= nag.negative_tokens:
            return pre_attention(x, c)
        rows = nag.rows.to(c.device)
        c_negative = c.clone()
        c_negative[rows] = c.index_select(0, rows) + negative.delta.to(c.dtype)
        split = x.shape[1] - nag.negative_tokens
        qkv_prompt, prompt = pre_attention(x[:, :split], c)
        qkv_negative, negative_intermediates = pre_attention(x[:, split:], c_negative)
        qkv = tuple(torch.cat([a, b], dim=1) for a, b in zip(qkv_prompt, qkv_negative))
        negative.applied += 1
        if prompt is None:  # the last context block (pre_only): no post_attention
            return qkv, None
        return qkv, (_SplitIntermediates(split, tuple(prompt), tuple(negative_intermediates)), None, None, None, None)


class ContextPostAttention(ModulePatch):
    """Object patch of an MMDiT ``context_block.post_attention``: each text's tokens with its own gates."""

    METHOD = "post_attention"

    def __call__(self, attn, *intermediates):
        post_attention = self.original
        if intermediates and isinstance(intermediates[0], _SplitIntermediates):
            split = intermediates[0]
            return torch.cat([post_attention(attn[:, :split.split], *split.prompt),
                              post_attention(attn[:, split.split:], *split.negative)], dim=1)
        return post_attention(attn, *intermediates)


def install(model_patcher, modulation: OwnPooledModulation) -> None:
    """Object patches on a cloned ModelPatcher (idempotent per module)."""
    net = diffusion_model_of(model_patcher)
    if getattr(net, modulation.site.embedder, None) is None:
        return  # no pooled vector in its modulation (Flux 2, HunyuanVideo 1.5; newer Flux blocks then have no txt_mod)
    patches = []
    if modulation.site.blocks == "flux":
        patches += [(f"double_blocks.{i}.txt_mod", "text") for i in range(len(getattr(net, "double_blocks", [])))]
        patches += [(f"single_blocks.{i}.modulation", "joint") for i in range(len(getattr(net, "single_blocks", [])))]
        for path, stream in patches:
            installer.module_patch(model_patcher, f"diffusion_model.{path}", TokenModulation, stream, modulation)
    else:
        for i in range(len(getattr(net, "joint_blocks", []))):
            path = f"diffusion_model.joint_blocks.{i}.context_block"
            patches.append(path)
            installer.module_patch(model_patcher, path, ContextPreAttention)
            installer.module_patch(model_patcher, path, ContextPostAttention)
    if not patches:
        raise FamilyError(f"{modulation.site.family}: no blocks found to modulate the NAG negative's text; "
                                f"this ComfyUI version builds the model differently. Please report it.")
