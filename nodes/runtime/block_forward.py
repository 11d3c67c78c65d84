"""DiTs without a block-replace whose blocks take ComfyUI's transformer_options (Cosmos Predict2): each hooked
block gets an object patch of its ``forward`` (``BlockForward``) that presents the call to the contributors
exactly as a ``DitBlockHook`` presents a replaced block: ``args["img"]`` is the block's token tensor
([B, L, D], or [B, T, H, W, D] on Cosmos Predict2), every other argument passes through unchanged."""

from __future__ import annotations

from .families import FamilySpec
from .slots import DitBlockHook, ModulePatch, Slot


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


def blocks(model_patcher, spec: FamilySpec, keys, contributor) -> None:
    """Register ``contributor`` on the block patches of ``keys`` ((group, index)); publishes the latent shape."""
    from . import install as installer

    attributes = dict(spec.groups)
    for group, index in keys:
        path = f"diffusion_model.{attributes[group]}.{index}"
        patch = installer.module_patch(model_patcher, path, BlockForward, spec, (group, index))
        model_patcher.add_object_patch(f"{path}.{BlockForward.METHOD}", patch.with_contributor(contributor))
    installer.latent_shape(model_patcher)
