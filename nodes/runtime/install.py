"""Installing the slots and contributors on a cloned ModelPatcher: idempotent, once per clone.

Each function either registers the contributor on our occupant of a slot (a copy of it: clones of a model
share the occupants) or puts a new occupant there that chains to the one it replaced. Wrappers are added
once per key; object patches once per class and path.
"""

from __future__ import annotations

from .blocks import text_length_block, unet_layer_path
from .families import FamilySpec
from .slots import (
    OVERRIDE_KEY,
    AttentionDispatcher,
    Contributor,
    DitBlockHook,
    UNetCrossAttentionHook,
    UNetLayerForward,
    UNetSelfAttentionHook,
    applied_guard,
    latent_shape_wrapper,
)

GUARD_WRAPPER_KEY = "guidance_kit_guard"
LATENT_WRAPPER_KEY = "guidance_kit_hooks"


def _replace_patches(model_patcher) -> dict:
    return model_patcher.model_options.setdefault("transformer_options", {}).setdefault("patches_replace", {})


def wrapper(model_patcher, key: str, function, kind: str | None = None) -> None:
    """Add a wrapper (APPLY_MODEL unless ``kind``) under ``key`` unless one is there."""
    import comfy.patcher_extension

    kind = kind or comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if not model_patcher.get_wrappers(kind, key):
        model_patcher.add_wrapper_with_key(kind, key, function)


def module_patch(model_patcher, module_path: str, cls, *args, **kwargs):
    """The object patch ``cls(module, *args, previous=<occupant>)`` of ``<module_path>.<cls.METHOD>`` (``module_path``
    below the BaseModel; "" = the BaseModel itself), unless an instance of ``cls`` is there already."""
    import comfy.utils

    path = f"{module_path}.{cls.METHOD}" if module_path else cls.METHOD
    current = model_patcher.object_patches.get(path)
    if isinstance(current, cls):
        return current
    module = comfy.utils.get_attr(model_patcher.model, module_path) if module_path else model_patcher.model
    patch = cls(module, *args, previous=current, **kwargs)
    model_patcher.add_object_patch(path, patch)
    return patch


def attention(model_patcher, contributor: Contributor) -> None:
    """Register ``contributor`` on the model's attention dispatcher (installing it, chained to a previous override)."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    current = to.get(OVERRIDE_KEY)
    if isinstance(current, AttentionDispatcher):
        to[OVERRIDE_KEY] = current.with_contributor(contributor)
    else:
        to[OVERRIDE_KEY] = AttentionDispatcher(previous=current, contributors=(contributor,))


def dit_blocks(model_patcher, spec: FamilySpec, layout, keys, contributor: Contributor) -> None:
    """Register ``contributor`` on the DiT block hooks of ``keys`` ((group, index)); joint single blocks also hook
    the last double block (it records the text length they need)."""
    if spec.block_hook == "layers":
        from . import lumina

        lumina.layers(model_patcher, spec, keys, contributor)
        return
    recorder = text_length_block(spec, layout, keys)
    if spec.block_hook in ("forward", "keywords", "batch_fourth"):
        from . import block_forward

        block_forward.blocks(model_patcher, spec, keys, contributor, recorder)
        return
    replace = _replace_patches(model_patcher)
    dit = dict(replace.get("dit", {}))
    hooked = {tuple(k): contributor for k in keys}
    if recorder is not None:
        hooked.setdefault(recorder, None)
    for (group, index), added in sorted(hooked.items()):
        patch_key = (f"{group}_block", index)
        current = dit.get(patch_key)
        if isinstance(current, DitBlockHook):
            dit[patch_key] = current.with_contributor(added)
        else:
            dit[patch_key] = DitBlockHook(spec, (group, index), previous=current,
                                          contributors=(added,) if added is not None else ())
    replace["dit"] = dit


def unet_attention(model_patcher, slot: str, keys, contributor: Contributor) -> None:
    """Register ``contributor`` on the UNet ``slot`` ("attn1" or "attn2") replaces of ``keys``."""
    cls = UNetSelfAttentionHook if slot == "attn1" else UNetCrossAttentionHook
    replace = _replace_patches(model_patcher)
    patches = dict(replace.get(slot, {}))
    for key in keys:
        current = patches.get(key)
        if isinstance(current, cls):
            patches[key] = current.with_contributor(contributor)
        else:
            patches[key] = cls(key, previous=current, contributors=(contributor,))
    replace[slot] = patches


def unet_layers(model_patcher, keys, contributor: Contributor) -> None:
    """Register ``contributor`` on the object patches of the UNet transformer layers ``keys``."""
    for key in keys:
        module_path = unet_layer_path(model_patcher, key)
        patch = module_patch(model_patcher, module_path, UNetLayerForward, key)
        model_patcher.add_object_patch(f"{module_path}.{UNetLayerForward.METHOD}", patch.with_contributor(contributor))


def guard(model_patcher) -> None:
    """The check that every guarded branch effect reaches the model (``slots.applied_guard``)."""
    wrapper(model_patcher, GUARD_WRAPPER_KEY, applied_guard)


def latent_shape(model_patcher) -> None:
    """Publish the latent shape to the blocks (token grids: SEG, S-CFG)."""
    wrapper(model_patcher, LATENT_WRAPPER_KEY, latent_shape_wrapper)
