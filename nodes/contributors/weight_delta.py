"""ComfyUI patches (a LoRA file, the patch difference of two clones of one model) → per-layer weight
deltas for one branch's rows.

Personalization guidance (θ_λ = θ_pre + λ·(θ_ft − θ_pre) for a LoRA fine-tune), Diffusion-NPO with a
LoRA, and a second MODEL that is a LoRA-patched clone of the sampled one all need predictions of
``W + ΔW`` in the same step as predictions of ``W``. This module turns the patches into ``DeltaEntry``
objects: low-rank ``up``/``down`` factors for plain LoRAs, a dense ΔW of the patched layer for the
other additive patches (LoHa, LoKr, full diffs, bias diffs). Non-additive patches (DoRA, 'set',
weight-merge strengths) are refused: their effect is not a sum of deltas. The layer patches that apply
the entries to the branch's rows inside the one batched forward are in ``row_delta.py``.
"""

from __future__ import annotations

import uuid

import torch

from .row_delta import DeltaEntry, delta_layer_classes


class DeltaError(ValueError):
    """A patch that cannot be applied as a row delta (message names the node and the fix)."""


def _is_lora_adapter(v) -> bool:
    from comfy.weight_adapter.lora import LoRAAdapter

    return isinstance(v, LoRAAdapter)


def _entry(label: str, key: str, module, weight: torch.Tensor, strength: float, v, offset) -> DeltaEntry:
    import comfy.lora

    target = "bias" if key.endswith(".bias") else "weight"
    out_slice = None
    shape = tuple(weight.shape)
    if offset is not None:
        dim, start, size = offset
        if dim != 0:
            raise DeltaError(f"{label}: a patch of {key} acts on a slice along dimension {dim}; only output-feature "
                             f"slices (fused qkv) can be applied per branch.")
        out_slice = (int(start), int(size))
        shape = (int(size),) + shape[1:]
    if _is_lora_adapter(v):
        up, down, alpha, mid, dora_scale, reshape = v.weights
        if dora_scale is not None:
            raise DeltaError(f"{label}: {key} is a DoRA patch; DoRA renormalises the whole weight, so it is not a sum "
                             f"of deltas and cannot be applied to one branch on shared weights. Use a plain LoRA.")
        conv = isinstance(module, torch.nn.modules.conv._ConvNd)
        lowrank_ok = (target == "weight" and mid is None and reshape is None and
                      ((not conv and up.ndim == 2 and down.ndim == 2) or
                       (conv and module.groups == 1 and down.ndim == weight.ndim and up.ndim == weight.ndim and
                        all(s == 1 for s in up.shape[2:]))))
        if lowrank_ok:
            scale = (float(alpha) / down.shape[0] if alpha is not None else 1.0) * strength
            return DeltaEntry(target, scale=scale, up=up, down=down, out_slice=out_slice)
    elif isinstance(v, tuple) and len(v) == 2 and v[0] == "set":
        raise DeltaError(f"{label}: {key} is a 'set' patch (replaces the weight), which is not a delta.")
    # dense fallback: ΔW of this layer only (LoHa, LoKr, full diffs, bias diffs)
    zero = torch.zeros(shape, dtype=torch.float32)
    delta = comfy.lora.calculate_weight([(strength, v, 1.0, None, None)], zero, key)
    return DeltaEntry(target, scale=1.0, dense=delta.to(_delta_dtype(weight)), out_slice=out_slice)


def _delta_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a dense delta is kept in: the weight's when it is a compute dtype, else float32 (quantized
    storage such as fp8 or int8 would lose the delta; it is cast to the activations' dtype when applied)."""
    dtype = getattr(weight, "dtype", torch.float32)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float32


def entries_from_patches(model_patcher, patches: list[tuple[str, float, object, tuple | None]], label: str
                         ) -> dict[str, list[DeltaEntry]]:
    """``[(weight key, strength, patch, offset)]`` → entries per module path (``diffusion_model.…``)."""
    import comfy.utils

    out: dict[str, list[DeltaEntry]] = {}
    for key, strength, v, offset in patches:
        if not key.startswith("diffusion_model."):
            continue
        module_path, _, _ = key.rpartition(".")
        try:
            module = comfy.utils.get_attr(model_patcher.model, module_path)
        except AttributeError:
            raise DeltaError(f"{label}: the patch key {key} does not exist in this model") from None
        check_layer(label, key, module)
        weight = comfy.utils.get_attr(model_patcher.model, key)
        out.setdefault(module_path, []).append(_entry(label, key, module, weight, strength, v, offset))
    if not out:
        raise DeltaError(f"{label}: the LoRA patches none of this model's diffusion-model layers (wrong model family "
                         f"for this LoRA, or a text-encoder-only LoRA).")
    return out


def check_layer(label: str, key: str, module) -> None:
    """Refuse a layer whose class is not one known to compute its output in its own ``forward``.

    The per-branch delta is added by an object patch of the layer's ``forward``: a layer class that does
    not compute its output there (a custom quantized layer of another pack, an expert bank, a norm
    layer) would let ComfyUI use its weight without the delta. Known: ``torch.nn.Linear`` and
    convolutions (every ``comfy.ops`` Linear/Conv in ComfyUI 0.3.x subclasses them) and newer ComfyUI's
    ``comfy.ops.MixedPrecisionOp`` layers (quantized checkpoints), which still run through ``forward``.
    """
    if isinstance(module, delta_layer_classes()):
        return
    cls = type(module)
    kind = ("a normalisation layer (LoRAs that also train norm layers are not supported per branch)"
            if "norm" in cls.__name__.lower() else
            "a layer class Guidance Kit does not know to compute its output through its forward(), so the delta "
            "could be skipped silently")
    raise DeltaError(f"{label}: the patch of {key} targets a {cls.__name__} layer ({cls.__module__}), {kind}. Only "
                     f"Linear and convolution layers (and ComfyUI's own quantized layers) can carry a per-branch "
                     f"delta. Use a checkpoint loaded with ComfyUI's own loaders, or load the LoRA-patched model as a "
                     f"second checkpoint (Autoguidance / Unconditional Priors take any MODEL).")


def lora_patches(model_patcher, lora_sd: dict, label: str) -> dict:
    """A LoRA state dict → ComfyUI patches for this model (``comfy.lora.load_lora``), as LoraLoader does."""
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora_sd), key_map, log_missing=False)
    if not loaded:
        raise DeltaError(f"{label}: the LoRA file has no keys for this model's diffusion model (wrong model family "
                         f"for this LoRA?)")
    return loaded


def as_patch_list(loaded: dict, strength: float) -> list[tuple[str, float, object, tuple | None]]:
    out = []
    for k, v in loaded.items():
        if isinstance(k, str):
            out.append((k, strength, v, None))
        else:
            if len(k) > 2 and k[2] is not None:
                raise DeltaError(f"patch of {k[0]} carries a conversion function; not supported per branch")
            out.append((k[0], strength, v, k[1]))
    return out


def patch_difference(main, other, label: str) -> list[tuple[str, float, object, tuple | None]]:
    """The patches turning ``main``'s weights into ``other``'s when both are clones of one model.

    Per weight key the two patch lists share a prefix (what both inherited); what follows in
    ``other`` is added, what follows in ``main`` is subtracted. Only additive patches (strength_model
    1, no conversion function) can be expressed this way.
    """
    diff = []
    for key in set(main.patches) | set(other.patches):
        a, b = main.patches.get(key, []), other.patches.get(key, [])
        n = 0
        while n < min(len(a), len(b)) and a[n] is b[n]:
            n += 1
        for sign, rest in ((-1.0, a[n:]), (1.0, b[n:])):
            for strength, v, strength_model, offset, function in rest:
                if strength_model != 1.0 or function is not None:
                    raise DeltaError(f"{label}: the two models share their weights but differ by a weight merge or a "
                                     f"converted patch on {key}, which is not a sum of deltas. Load the second model "
                                     f"with its own checkpoint loader.")
                diff.append((key, sign * strength, v, offset))
    return diff


def new_delta_id(label: str) -> str:
    return f"{label}/{uuid.uuid4().hex[:12]}"
