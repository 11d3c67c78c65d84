"""Weight deltas on the rows of one branch: a second set of weights without a second copy of them.

Personalization guidance (θ_λ = θ_pre + λ·(θ_ft − θ_pre) for a LoRA fine-tune), Diffusion-NPO with
a LoRA, and a second MODEL that is a LoRA-patched clone of the sampled one all need predictions of
``W + ΔW`` with ``ΔW`` a (low-rank) patch, in the same step as predictions of ``W``. Patching the
weights would need a second copy of every patched layer (ComfyUI's weight hooks keep a backup and a
cached patched copy of each touched weight, and run each hook group as its own forward). Instead the
patched layers get an object patch of their ``forward`` (``DeltaForward``) that computes

    y = layer(x)                        (every row: the model's own weights, LoRAs already merged)
    y[rows] += s·up(down(x[rows]))·α/r  (the branch's rows only; low-rank, no dense ΔW)

so cond, uncond and the branch share one forward and one set of weights; the only memory is the
LoRA factors. Patches that are not plain low-rank LoRAs (LoHa, LoKr, full diffs, bias diffs) fall
back to a dense ΔW per patched layer (the layer's size, never the model's). Non-additive patches
(DoRA, 'set', weight-merge strengths) are refused: their effect is not a sum of deltas.

Which rows: the engine puts each branch in its own entry of the batched call and records entry
index → Branch in ``transformer_options["guidance_kit_branches"]``; ComfyUI records the entry of
each batch chunk in ``cond_or_uncond``. An APPLY_MODEL wrapper turns that into ``{delta id: (rows,
strength)}`` for the duration of the forward; the layer patches read it. A forward whose rows
carry a delta but where no patched layer ran raises ``DeltaNotApplied`` (never a silent no-op).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .engine import BRANCH_MAP_KEY

WRAPPER_KEY = "guidance_kit_weight_delta"


class DeltaError(ValueError):
    """A patch that cannot be applied as a row delta (message names the node and the fix)."""


class DeltaNotApplied(RuntimeError):
    """A branch with a weight delta ran, but no patched layer was reached."""


@dataclass(frozen=True)
class RowDelta:
    """A Branch perturbation: this branch's rows get ``strength ×`` the delta ``delta_id``.

    Frozen and tensor-free like the rest of the plan; the tensors live on the layer patches.
    """

    label: str
    delta_id: str
    strength: float = 1.0
    layers: int = 0  # number of patched layers (for messages)


@dataclass(eq=False)
class Entry:
    """One patch of one layer: low-rank (``up``, ``down``, ``scale``) or dense (``dense``)."""

    target: str  # "weight" | "bias"
    scale: float = 1.0
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    out_slice: tuple[int, int] | None = None  # (start, size) on the output features (fused qkv patches)
    _cache: dict = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.up, self.down, self.dense) if t is not None]

    def _on(self, name: str, ref: torch.Tensor) -> torch.Tensor:
        key = (name, ref.device, ref.dtype)
        t = self._cache.get(key)
        if t is None:
            t = getattr(self, name).to(device=ref.device, dtype=ref.dtype)
            self._cache.clear() if len(self._cache) > 6 else None
            self._cache[key] = t
        return t

    def output(self, module, x: torch.Tensor) -> torch.Tensor:
        """The delta of the layer's output for input rows ``x`` (unscaled by the branch strength)."""
        conv = isinstance(module, torch.nn.modules.conv._ConvNd)
        if self.target == "bias":
            b = self._on("dense", x)
            shape = [1] * x.ndim
            if conv:
                shape[1] = -1
            else:
                shape[-1] = -1
            return b.reshape(shape) * self.scale
        if self.dense is not None:
            w = self._on("dense", x)
            out = module._conv_forward(x, w, None) if conv else F.linear(x, w)
            return out * self.scale
        down, up = self._on("down", x), self._on("up", x)
        if conv:
            h = module._conv_forward(x, down, None)
            conv_fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[up.ndim]
            return conv_fn(h, up) * self.scale
        return F.linear(F.linear(x, down), up) * self.scale


_STACK: list[dict] = []  # the row groups of the forward in progress (ComfyUI runs one prompt at a time)


class DeltaForward:
    """Object patch of one Linear/Conv layer's ``forward``: adds the deltas to their branches' rows."""

    is_guidance_kit = True

    def __init__(self, module, entries: dict[str, list[Entry]], previous=None):
        self.module = module
        self.entries = entries
        self.previous = previous

    def with_entries(self, delta_id: str, entries: list[Entry]) -> DeltaForward:
        merged = dict(self.entries)
        merged[delta_id] = list(merged.get(delta_id, [])) + entries
        return DeltaForward(self.module, merged, self.previous)

    def _original(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, x, *args, **kwargs):
        y = self._original(x, *args, **kwargs)
        if not _STACK:
            return y
        context = _STACK[-1]
        conv = isinstance(self.module, torch.nn.modules.conv._ConvNd)
        cloned = False
        for delta_id, (rows, strength) in context["groups"].items():
            entries = self.entries.get(delta_id)
            if not entries or strength == 0.0:
                continue
            idx = _expand_rows(rows, context["batch"], x.shape[0]).to(x.device)
            xr = x[idx]
            yr = y[idx]
            for e in entries:
                d = e.output(self.module, xr).to(yr.dtype) * strength
                if e.out_slice is None:
                    yr = yr + d
                else:
                    start, size = e.out_slice
                    yr = yr.clone()
                    if conv:
                        yr[:, start:start + size] += d
                    else:
                        yr[..., start:start + size] += d
            if not cloned:
                y, cloned = y.clone(), True
            y[idx] = yr
            context["applied"].add(delta_id)
        return y


def _expand_rows(rows: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    if n == batch:
        return rows
    if n % batch == 0:  # batch folded with frames/groups, batch-major (b, k) → b·k
        k = n // batch
        return (rows[:, None] * k + torch.arange(k)[None, :]).reshape(-1)
    raise DeltaNotApplied(f"Guidance Kit: a patched layer saw {n} rows in a forward of {batch} samples; the row "
                          f"delta cannot tell the branches apart here.")


def row_groups(transformer_options: dict, batch_size: int) -> dict[str, tuple[torch.Tensor, float]]:
    """``{delta id: (row indices, strength)}`` for the branches of this forward that carry a RowDelta."""
    branch_map = transformer_options.get(BRANCH_MAP_KEY)
    chunks = transformer_options.get("cond_or_uncond")
    if not branch_map or not chunks:
        return {}
    per_chunk = batch_size // len(chunks)
    if per_chunk * len(chunks) != batch_size:
        raise RuntimeError(f"Guidance Kit: a batch of {batch_size} rows does not split into {len(chunks)} chunks")
    rows: dict[str, tuple[list[int], float]] = {}
    for chunk, index in enumerate(chunks):
        p = getattr(branch_map.get(index), "perturbation", None)
        if not isinstance(p, RowDelta):
            continue
        r, _ = rows.setdefault(p.delta_id, ([], p.strength))
        r.extend(range(chunk * per_chunk, (chunk + 1) * per_chunk))
    return {k: (torch.tensor(r, dtype=torch.long), s) for k, (r, s) in rows.items()}


def delta_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: publishes this forward's delta rows to the layer patches."""
    to = args[3] if len(args) > 3 else kwargs.get("transformer_options")
    groups = row_groups(to, x.shape[0]) if isinstance(to, dict) else {}
    if not groups:
        return executor(x, t, *args, **kwargs)
    context = {"groups": groups, "batch": int(x.shape[0]), "applied": set()}
    _STACK.append(context)
    try:
        out = executor(x, t, *args, **kwargs)
    finally:
        _STACK.pop()
    missing = [d for d, (_, s) in groups.items() if s != 0.0 and d not in context["applied"]]
    if missing:
        raise DeltaNotApplied(
            "Guidance Kit: a branch with a LoRA/weight delta ran but none of its patched layers was reached (another "
            "node replaced the layers' forward after this node, or the model calls these weights directly). Put the "
            "Guidance Kit node last, after other model patches.")
    return out


# ------------------------------------------------------------------------------------------------
# building deltas from ComfyUI patches
# ------------------------------------------------------------------------------------------------

def _is_lora_adapter(v) -> bool:
    from comfy.weight_adapter.lora import LoRAAdapter

    return isinstance(v, LoRAAdapter)


def _patch_name(v) -> str:
    return getattr(v, "name", None) or (v[0] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                                         else "diff")


def _entry(label: str, key: str, module, weight: torch.Tensor, strength: float, v, offset) -> Entry:
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
            return Entry(target, scale=scale, up=up, down=down, out_slice=out_slice)
    elif isinstance(v, tuple) and len(v) == 2 and v[0] == "set":
        raise DeltaError(f"{label}: {key} is a 'set' patch (replaces the weight), which is not a delta.")
    # dense fallback: ΔW of this layer only (LoHa, LoKr, full diffs, bias diffs)
    zero = torch.zeros(shape, dtype=torch.float32)
    delta = comfy.lora.calculate_weight([(strength, v, 1.0, None, None)], zero, key)
    return Entry(target, scale=1.0, dense=delta.to(weight.dtype), out_slice=out_slice)


def entries_from_patches(model_patcher, patches: list[tuple[str, float, object, tuple | None]], label: str
                         ) -> dict[str, list[Entry]]:
    """``[(weight key, strength, patch, offset)]`` → entries per module path (``diffusion_model.…``)."""
    import comfy.utils

    out: dict[str, list[Entry]] = {}
    for key, strength, v, offset in patches:
        if not key.startswith("diffusion_model."):
            continue
        module_path, _, _ = key.rpartition(".")
        try:
            module = comfy.utils.get_attr(model_patcher.model, module_path)
        except AttributeError:
            raise DeltaError(f"{label}: the patch key {key} does not exist in this model") from None
        if not isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            raise DeltaError(f"{label}: the patch of {key} targets a {type(module).__name__} layer; only Linear and "
                             f"convolution layers can carry a per-branch delta (LoRAs that also train norm layers "
                             f"are not supported here).")
        weight = comfy.utils.get_attr(model_patcher.model, key)
        out.setdefault(module_path, []).append(_entry(label, key, module, weight, strength, v, offset))
    if not out:
        raise DeltaError(f"{label}: the LoRA patches none of this model's diffusion-model layers (wrong model family "
                         f"for this LoRA, or a text-encoder-only LoRA).")
    return out


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


def install_delta(model_patcher, delta_id: str, entries: dict[str, list[Entry]]) -> None:
    """Install the layer patches of delta ``delta_id`` on a (cloned) ModelPatcher."""
    import comfy.patcher_extension
    import comfy.utils

    for module_path, items in entries.items():
        path = module_path + ".forward"
        current = model_patcher.object_patches.get(path)
        if isinstance(current, DeltaForward):
            patch = current.with_entries(delta_id, items)
        else:
            patch = DeltaForward(comfy.utils.get_attr(model_patcher.model, module_path), {delta_id: items},
                                 previous=current)
        model_patcher.add_object_patch(path, patch)
    if not model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, delta_wrapper)


def delta_bytes(model_patcher) -> int:
    """Bytes held by this patcher's delta patches (LoRA factors / dense layer deltas), counted once each."""
    seen, total = set(), 0
    for patch in model_patcher.object_patches.values():
        if isinstance(patch, DeltaForward):
            for items in patch.entries.values():
                for e in items:
                    for t in e.tensors():
                        if t.data_ptr() not in seen:
                            seen.add(t.data_ptr())
                            total += t.numel() * t.element_size()
    return total
