"""The one layer/block selection syntax shared by every perturbation method.

Grammar (case-insensitive; items separated by commas or semicolons)::

    selection := "auto" | item ("," item)*
    item      := group spec (" " spec)*
    group     := input | middle | output            (UNet: SD1.5, SDXL; aliases down, mid, up)
               | double | single                    (DiT blocks as ComfyUI numbers them; alias blocks = double)
    spec      := N | N-M | all                       block indices (inclusive range)
               | N.T | N.T-U                          UNet only: transformer layer(s) T..U inside block N

Examples: ``middle 0`` · ``input 4-8, middle 0`` · ``output 0.2-5`` · ``double 7-9, single 0-37`` ·
``blocks 10`` (WAN, LTXV, Qwen-Image, SD3: their blocks are ComfyUI's "double" blocks).

Parsing is pure; ``resolve`` checks a parsed selection against a model's block layout
(``BlockLayout``) and returns concrete block keys, raising ``LayerError`` with the valid ranges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

GROUP_ALIASES = {
    "input": "input", "down": "input", "in": "input",
    "middle": "middle", "mid": "middle",
    "output": "output", "up": "output", "out": "output",
    "double": "double", "blocks": "double", "block": "double",
    "single": "single",
}
UNET_GROUPS = ("input", "middle", "output")
DIT_GROUPS = ("double", "single")


class LayerError(ValueError):
    """A layer selection that does not parse or does not fit the model."""


@dataclass(frozen=True)
class LayerSpec:
    group: str
    first: int | None  # None = all blocks of the group
    last: int | None
    layer_first: int | None = None  # UNet transformer layers inside the block (None = all)
    layer_last: int | None = None


@dataclass(frozen=True)
class LayerSelection:
    specs: tuple[LayerSpec, ...]
    auto: bool = False
    text: str = ""

    def __str__(self) -> str:
        return self.text


_SPEC = re.compile(r"^(all|\d+)(?:-(\d+))?(?:\.(\d+)(?:-(\d+))?)?$")


def parse_layers(text: str, owner: str) -> LayerSelection:
    """Parse a selection string; errors name ``owner`` (the node) and show the syntax."""
    raw = (text or "").strip()
    if not raw:
        raise LayerError(f"{owner}: the layer selection is empty; write 'auto' or e.g. 'middle 0', "
                         f"'input 4-8, middle 0', 'double 7-9, single 0-37'")
    if raw.lower() == "auto":
        return LayerSelection((), auto=True, text="auto")
    specs = []
    for item in re.split(r"[,;]", raw):
        words = item.split()
        if not words:
            continue
        group = GROUP_ALIASES.get(words[0].lower())
        if group is None:
            raise LayerError(f"{owner}: unknown block group '{words[0]}' in '{item.strip()}'; use input, middle, "
                             f"output (UNet) or double, single (DiT)")
        if len(words) == 1:
            raise LayerError(f"{owner}: '{item.strip()}' needs block numbers, e.g. '{words[0]} 0' or "
                             f"'{words[0]} 2-5' or '{words[0]} all'")
        for word in words[1:]:
            m = _SPEC.match(word.lower())
            if m is None:
                raise LayerError(f"{owner}: cannot read '{word}' in '{item.strip()}'; write a block number (7), "
                                 f"a range (7-9), 'all', or for UNet blocks a layer range (8.2-5)")
            if m.group(1) == "all":
                if m.group(2) or m.group(3):
                    raise LayerError(f"{owner}: 'all' takes no range ('{word}')")
                specs.append(LayerSpec(group, None, None))
                continue
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else first
            if last < first:
                raise LayerError(f"{owner}: the range '{word}' runs backwards")
            layer_first = layer_last = None
            if m.group(3) is not None:
                if group not in UNET_GROUPS:
                    raise LayerError(f"{owner}: '{word}': layer ranges inside a block (N.T) exist only for UNet "
                                     f"blocks (input, middle, output)")
                if m.group(2):
                    raise LayerError(f"{owner}: '{word}': give one block with a layer range (8.2-5), not a block "
                                     f"range with layers")
                layer_first = int(m.group(3))
                layer_last = int(m.group(4)) if m.group(4) else layer_first
                if layer_last < layer_first:
                    raise LayerError(f"{owner}: the layer range in '{word}' runs backwards")
            specs.append(LayerSpec(group, first, last, layer_first, layer_last))
    if not specs:
        raise LayerError(f"{owner}: no blocks selected in '{raw}'")
    return LayerSelection(tuple(specs), text=raw)


@dataclass(frozen=True)
class BlockLayout:
    """The blocks a model has, as ComfyUI's hooks address them.

    UNet: ``unet_blocks[group]`` maps block index → number of transformer layers in it (only blocks
    with transformers are listed); ``unet_input_levels`` maps input block index → resolution level
    (0 = the latent's resolution, +1 per downsampling). DiT: ``dit_blocks[group]`` = number of blocks
    of that group.
    """

    family: str
    unet_blocks: dict[str, dict[int, int]] = field(default_factory=dict)
    dit_blocks: dict[str, int] = field(default_factory=dict)
    unet_input_levels: dict[int, int] = field(default_factory=dict)  # input block → downsamplings before it

    @property
    def is_unet(self) -> bool:
        return bool(self.unet_blocks)

    def describe(self) -> str:
        if self.is_unet:
            parts = []
            for group in UNET_GROUPS:
                blocks = self.unet_blocks.get(group, {})
                if blocks:
                    parts.append(f"{group} " + " ".join(f"{b}(×{n})" for b, n in sorted(blocks.items())))
            return "; ".join(parts)
        return ", ".join(f"{group} 0–{n - 1}" for group, n in self.dit_blocks.items() if n > 0)


def resolve(selection: LayerSelection, layout: BlockLayout, owner: str) -> tuple[tuple, ...]:
    """Concrete block keys: UNet ``(group, block, layer)``; DiT ``(group, index)``. Sorted, unique."""
    if selection.auto:
        raise LayerError(f"{owner}: 'auto' must be replaced by the family default before resolving")
    keys = set()
    for spec in selection.specs:
        if layout.is_unet:
            if spec.group not in UNET_GROUPS:
                raise LayerError(f"{owner}: '{spec.group}' blocks do not exist on {layout.family} (a UNet); it has "
                                 f"transformer layers in: {layout.describe()}")
            blocks = layout.unet_blocks.get(spec.group, {})
            chosen = sorted(blocks) if spec.first is None else list(range(spec.first, spec.last + 1))
            for b in chosen:
                if b not in blocks:
                    raise LayerError(f"{owner}: {spec.group} block {b} has no transformer layers on {layout.family}; "
                                     f"blocks with attention: {layout.describe()}")
                n = blocks[b]
                if spec.layer_first is None:
                    layers = range(n)
                else:
                    if spec.layer_last >= n:
                        raise LayerError(f"{owner}: {spec.group} block {b} has layers 0–{n - 1} on {layout.family}; "
                                         f"'{b}.{spec.layer_first}-{spec.layer_last}' is out of range")
                    layers = range(spec.layer_first, spec.layer_last + 1)
                keys.update((spec.group, b, t) for t in layers)
        else:
            if spec.group not in DIT_GROUPS or layout.dit_blocks.get(spec.group, 0) == 0:
                raise LayerError(f"{owner}: '{spec.group}' blocks do not exist on {layout.family}; it has "
                                 f"{layout.describe()}")
            n = layout.dit_blocks[spec.group]
            chosen = range(n) if spec.first is None else range(spec.first, spec.last + 1)
            if spec.first is not None and spec.last >= n:
                raise LayerError(f"{owner}: {spec.group} {spec.first}-{spec.last} is out of range on "
                                 f"{layout.family}, which has {spec.group} blocks 0–{n - 1}")
            keys.update((spec.group, i) for i in chosen)
    return tuple(sorted(keys))
