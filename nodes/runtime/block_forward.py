"""DiTs without a block-replace whose blocks take ComfyUI's transformer_options: each hooked block gets an object
patch of its ``forward`` that presents the call to the contributors exactly as a ``DitBlockHook`` presents a
replaced block; every other argument passes through unchanged.

* ``BlockForward`` (Cosmos Predict2, ``block_hook="forward"``): ``forward(x, ...)``; ``args["img"]`` is the
  block's token tensor ([B, L, D], or [B, T, H, W, D] on Cosmos Predict2).
* ``BatchFourthBlockForward`` (Cosmos v1, ``block_hook="batch_fourth"``): ``forward(x [T, H, W, B, D], ...)``
  presented as [B, T, H, W, D]; its blocks are a ModuleDict ('block0', ...), addressed by position.
* ``KeywordBlockForward`` (HiDream, ``block_hook="keywords"``): the model calls its blocks with keywords only
  (``image_tokens``, ``text_tokens``, ...). Double-stream blocks return (image, text) and are joint ([image,
  text] in one attention call): ``args["img"]`` / ``args["txt"]``. Single-stream blocks carry [image, text] in
  ``image_tokens`` with ``text_tokens=None``; the last double block records the text length they need.
"""

from __future__ import annotations

from .families import FamilySpec, block_name
from .slots import TEXT_LENGTH_KEY, DitBlockHook, ModulePatch, Slot


class BlockForward(Slot, ModulePatch):
    """Object patch of one DiT block's ``forward``: its contributors see it as a replaced block."""

    def __init__(self, module, spec: FamilySpec, key: tuple[str, int], previous=None, contributors: tuple = ()):
        ModulePatch.__init__(self, module, previous)
        self.spec = spec
        self.key = key
        self.contributors = contributors

    def __call__(self, x, *args, transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        if not any(c.present(to) for c in self.contributors):
            return self.original(x, *args, transformer_options=to, **kwargs)

        def run(block_args: dict) -> dict:
            options = block_args["transformer_options"]
            return {"img": self.original(block_args["img"], *args, transformer_options=options, **kwargs)}

        hook = DitBlockHook(self.spec, self.key, contributors=self.contributors)
        return hook({"img": x, "transformer_options": to}, {"original_block": run})["img"]


class KeywordBlockForward(BlockForward):
    """Object patch of a HiDream block's ``forward`` (keyword arguments; double blocks return (image, text))."""

    def __call__(self, image_tokens=None, text_tokens=None, transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        double = text_tokens is not None
        if double and self.spec.joint:
            to[TEXT_LENGTH_KEY] = text_tokens.shape[1]  # for the single blocks after this one
        if not any(c.present(to) for c in self.contributors):
            return self.original(image_tokens=image_tokens, text_tokens=text_tokens, transformer_options=to, **kwargs)

        def run(block_args: dict) -> dict:
            result = self.original(image_tokens=block_args["img"], text_tokens=block_args.get("txt"),
                                   transformer_options=block_args["transformer_options"], **kwargs)
            return {"img": result[0], "txt": result[1]} if double else {"img": result}

        block_args = {"img": image_tokens, "transformer_options": to}
        if double:
            block_args["txt"] = text_tokens
        result = DitBlockHook(self.spec, self.key, contributors=self.contributors)(block_args, {"original_block": run})
        return (result["img"], result["txt"]) if double else result["img"]


class BatchFourthBlockForward(BlockForward):
    """Object patch of a Cosmos (v1) block's ``forward``: its tokens are [T, H, W, B, D] (the batch fourth); the
    contributors see them as [B, T, H, W, D] and the block gets them back in its own order."""

    def __call__(self, x, *args, transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        if not any(c.present(to) for c in self.contributors):
            return self.original(x, *args, transformer_options=to, **kwargs)

        def run(block_args: dict) -> dict:
            tokens = block_args["img"].permute(1, 2, 3, 0, 4)
            result = self.original(tokens, *args, transformer_options=block_args["transformer_options"], **kwargs)
            return {"img": result.permute(3, 0, 1, 2, 4)}

        hook = DitBlockHook(self.spec, self.key, contributors=self.contributors)
        return hook({"img": x.permute(3, 0, 1, 2, 4), "transformer_options": to},
                    {"original_block": run})["img"].permute(1, 2, 3, 0, 4)


PATCHES = {"forward": BlockForward, "keywords": KeywordBlockForward, "batch_fourth": BatchFourthBlockForward}


def blocks(model_patcher, spec: FamilySpec, keys, contributor, recorder: tuple[str, int] | None = None) -> None:
    """Register ``contributor`` on the block patches of ``keys`` ((group, index)); ``recorder``: a block patched
    without it, only to record the text length (the last double block before hooked joint single blocks).
    Publishes the latent shape."""
    from . import install as installer

    attributes = dict(spec.groups)
    cls = PATCHES[spec.block_hook]
    hooked = {tuple(k): contributor for k in keys}
    if recorder is not None:
        hooked.setdefault(recorder, None)
    net = model_patcher.model.diffusion_model
    for (group, index), added in sorted(hooked.items()):
        path = f"diffusion_model.{attributes[group]}.{block_name(getattr(net, attributes[group]), index)}"
        patch = installer.module_patch(model_patcher, path, cls, spec, (group, index))
        model_patcher.add_object_patch(f"{path}.{cls.METHOD}", patch.with_contributor(added))
    installer.latent_shape(model_patcher)
