"""Where a family's blocks are: UNet transformer layers by (group, block, layer), DiT blocks by (group, index).

The layer-selection syntax (``guiders/layers.py``) resolves against the ``BlockLayout`` built here; the
installers (``install.py``) find the modules and patch paths here.
"""

from __future__ import annotations

import math

from ...guiders.layers import BlockLayout
from .families import FamilyError, FamilySpec, diffusion_model_of


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


def unet_layer_path(model_patcher, key: tuple[str, int, int]) -> str:
    """The module path of the UNet transformer layer ``key`` (below the BaseModel)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    group, b, t = key
    net = diffusion_model_of(model_patcher)
    block = net.middle_block if group == "middle" else (net.input_blocks if group == "input" else net.output_blocks)[b]
    prefix = "diffusion_model.middle_block" if group == "middle" else f"diffusion_model.{group}_blocks.{b}"
    for i, layer in enumerate(block):
        if isinstance(layer, SpatialTransformer):
            return f"{prefix}.{i}.transformer_blocks.{t}"
    raise FamilyError(f"no transformer layer at {key}")


def block_layout(model_patcher, spec: FamilySpec) -> BlockLayout:
    net = diffusion_model_of(model_patcher)
    if spec.is_unet:
        blocks: dict[str, dict[int, int]] = {}
        for group, b, _t in unet_layers(net):
            blocks.setdefault(group, {})
            blocks[group][b] = blocks[group].get(b, 0) + 1
        return BlockLayout(spec.name, unet_blocks=blocks, unet_input_levels=unet_input_levels(net))
    return BlockLayout(spec.name, dit_blocks={group: len(getattr(net, attr)) for group, attr in spec.groups})


def first_block(spec: FamilySpec, layout: BlockLayout) -> tuple:
    """The model's first block (S²-Guidance never drops it)."""
    if spec.is_unet:
        for group in ("input", "middle", "output"):
            blocks = layout.unet_blocks.get(group)
            if blocks:
                return (group, min(blocks), 0)
    return ("double", 0) if layout.dit_blocks.get("double") else ("single", 0)


def text_length_block(spec: FamilySpec, layout: BlockLayout, keys) -> tuple[str, int] | None:
    """The block whose hook must record the text length for ``keys``: joint single blocks carry text and
    image tokens in one stream, and only the double blocks before them show the text's length."""
    doubles = layout.dit_blocks.get("double", 0)
    if spec.joint and doubles and any(k[0] == "single" for k in keys):
        return ("double", doubles - 1)
    return None


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
