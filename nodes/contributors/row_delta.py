"""Weight deltas on the rows of one branch: a second set of weights without a second copy of them.

Used by Personalization Guidance, Diffusion-NPO (LoRA) and a second MODEL that is a LoRA-patched clone of
the sampled one (Autoguidance, Unconditional Priors); ``weight_delta.py`` turns ComfyUI patches into the
``DeltaEntry`` objects applied here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...guiders.plan import BranchEffect
from ..runtime import install as installer
from ..runtime.rows import Forward, current_options, fold_rows, published
from ..runtime.slots import ModulePatch

# ------------------------------------------------------------------------------------------------
# weight deltas: a LoRA / patch difference on one branch's rows (Personalization, NPO, LoRA clones)
# ------------------------------------------------------------------------------------------------
# Weight deltas on the rows of one branch: a second set of weights without a second copy of them.
#
# Personalization guidance (θ_λ = θ_pre + λ·(θ_ft − θ_pre) for a LoRA fine-tune), Diffusion-NPO with
# a LoRA, and a second MODEL that is a LoRA-patched clone of the sampled one all need predictions of
# ``W + ΔW`` with ``ΔW`` a (low-rank) patch, in the same step as predictions of ``W``. Patching the
# weights would need a second copy of every patched layer (ComfyUI's weight hooks keep a backup and a
# cached patched copy of each touched weight, and run each hook group as its own forward). Instead the
# patched layers get an object patch of their ``forward`` (``DeltaForward``) that computes
#
#     y = layer(x)                        (every row: the model's own weights, LoRAs already merged)
#     y[rows] += s·up(down(x[rows]))·α/r  (the branch's rows only; low-rank, no dense ΔW)
#
# so cond, uncond and the branch share one forward and one set of weights; the only memory is the
# LoRA factors. Patches that are not plain low-rank LoRAs (LoHa, LoKr, full diffs, bias diffs) fall
# back to a dense ΔW per patched layer (the layer's size, never the model's). Non-additive patches
# (DoRA, 'set', weight-merge strengths) are refused: their effect is not a sum of deltas.
#
# Which rows: the engine puts each branch in its own entry of the batched call and records entry
# index → Branch in ``transformer_options["guidance_kit_branches"]``; ComfyUI records the entry of
# each batch chunk in ``cond_or_uncond``. An APPLY_MODEL wrapper turns that into ``{delta id: (rows,
# strength)}`` for the duration of the forward (``rows.published``: per thread and call); the layer patches read
# it and record which layers they reached. A forward whose rows carry a delta but where any patched layer
# was not reached through its forward raises ``DeltaNotApplied`` naming the layers (never a silent or
# partial delta).

DELTA_WRAPPER_KEY = "guidance_kit_weight_delta"


class DeltaNotApplied(RuntimeError):
    """A branch with a weight delta ran, but no patched layer was reached."""


@dataclass(frozen=True)
class RowDelta(BranchEffect):
    """A Branch perturbation: this branch's rows get ``strength ×`` the delta ``delta_id``.

    Frozen and tensor-free like the rest of the plan; the tensors live on the layer patches.
    """

    label: str
    delta_id: str
    strength: float = 1.0
    layers: int = 0  # number of patched layers (for messages)

    def rows_key(self) -> str:
        return self.delta_id  # branches with the same delta share its rows


@dataclass(eq=False)
class DeltaEntry:
    """One patch of one layer (built by ``weight_delta.py``): low-rank (``up``, ``down``, ``scale``) or dense
    (``dense``)."""

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


# The row groups of the forward in progress are in its transformer_options (``DELTA_ROWS_KEY``), which the layer
# patches find through ``rows.current_options`` (per thread and call: ComfyUI's multi-GPU option runs forwards of
# one model in several threads at once; each sees only its own rows).
DELTA_ROWS_KEY = "guidance_kit_delta_rows"
DELTA_LAYERS_KEY = "guidance_kit_delta_layers"  # transformer_options: {delta id: (label, patched layer paths)}


class DeltaForward(ModulePatch):
    """Object patch of one Linear/Conv layer's ``forward``: adds the deltas to their branches' rows.

    ``path`` is the layer's module path; every call that applies a delta records it, so the APPLY_MODEL
    wrapper can tell which patched layers a forward never reached through their ``forward``.
    """

    is_guidance_kit = True

    def __init__(self, module, entries: dict[str, list[DeltaEntry]], previous=None, path: str = ""):
        super().__init__(module, previous)
        self.entries = entries
        self.path = path

    def with_entries(self, delta_id: str, entries: list[DeltaEntry]) -> DeltaForward:
        merged = dict(self.entries)
        merged[delta_id] = list(merged.get(delta_id, [])) + entries
        return DeltaForward(self.module, merged, self.previous, self.path)

    def __call__(self, x, *args, **kwargs):
        y = self.original(x, *args, **kwargs)
        context = current_options().get(DELTA_ROWS_KEY)
        if context is None:
            return y
        conv = isinstance(self.module, torch.nn.modules.conv._ConvNd)
        cloned = False
        for delta_id, (rows, strength) in context["groups"].items():
            entries = self.entries.get(delta_id)
            if not entries or strength == 0.0:
                continue
            idx = _layer_rows(rows, context["batch"], x.shape[0]).to(x.device)
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
            context["reached"].add((delta_id, self.path))
        return y


def _layer_rows(rows: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """The rows of a layer that sees ``n`` rows in a forward of ``batch`` samples (frames or groups folded in)."""
    folded = fold_rows(rows, batch, n)
    if folded is not None:
        return folded
    raise DeltaNotApplied(f"Guidance Kit: a patched layer saw {n} rows in a forward of {batch} samples; the row "
                          f"delta cannot tell the branches apart here.")


def row_groups(transformer_options: dict, batch_size: int) -> dict[str, tuple[torch.Tensor, float]]:
    """``{delta id: (row indices, strength)}`` for the branches of this forward that carry a RowDelta."""
    return {p.delta_id: (rows, p.strength) for p, rows in Forward(transformer_options, batch_size).of_type(RowDelta)}


MISSED_LAYERS_SHOWN = 8


def _check_binding(model, layers: dict) -> None:
    """The layer patches must sit on this model's own modules: ComfyUI's multi-GPU clones copy the object
    patches, which then still point at the main copy's modules (other device, other weights)."""
    import comfy.utils

    for label, paths in layers.values():
        for path in paths[:1]:
            try:
                module = comfy.utils.get_attr(model, path)
            except AttributeError:
                continue
            patch = module.__dict__.get("forward")
            if isinstance(patch, DeltaForward) and patch.module is not module:
                raise DeltaNotApplied(
                    f"{label}: the LoRA delta's layer patches belong to another copy of this model (ComfyUI's "
                    f"multi-GPU work split clones the model per device), so they would compute with the other "
                    f"copy's weights. Run this node without the multi-GPU split, or load the LoRA-patched model "
                    f"as a second checkpoint.")


def _missed_layers_message(label: str, missed: list[str], total: int) -> str:
    shown = ", ".join(p.removeprefix("diffusion_model.") for p in missed[:MISSED_LAYERS_SHOWN])
    more = f" and {len(missed) - MISSED_LAYERS_SHOWN} more" if len(missed) > MISSED_LAYERS_SHOWN else ""
    return (f"{label}: {len(missed)} of the {total} layers its LoRA/weight delta patches were not reached through "
            f"their forward in this model call ({shown}{more}), so the branch would get only part of the delta. "
            f"ComfyUI consumed these weights without calling the layer (newer ComfyUI's fused linear+activation "
            f"path of WAN 'ffn.2' / LTXV 'ff.net.2' with INT8 weights or --fast fp16_accumulation, or a custom "
            f"quantized layer), or another node replaced their forward after this node. Fix: run without "
            f"fp16 accumulation / with a non-INT8 checkpoint, put this node after nodes that patch the same "
            f"layers, or load the LoRA-patched model as a second checkpoint (Autoguidance / Unconditional "
            f"Priors take any MODEL).")


def delta_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: publishes this forward's delta rows to the layer patches, then checks that every
    patched layer of every active delta was reached (a partial delta is an error, never silent)."""
    to = args[3] if len(args) > 3 else kwargs.get("transformer_options")
    groups = row_groups(to, x.shape[0]) if isinstance(to, dict) else {}
    if not groups:
        return executor(x, t, *args, **kwargs)
    layers = to.get(DELTA_LAYERS_KEY) or {}
    _check_binding(executor.class_obj, {d: layers[d] for d in groups if d in layers})
    context = {"groups": groups, "batch": int(x.shape[0]), "reached": set()}
    with published(to, {DELTA_ROWS_KEY: context}):
        out = executor(x, t, *args, **kwargs)
    reached = context["reached"]
    for delta_id, (_, strength) in groups.items():
        if strength == 0.0:
            continue
        label, paths = layers.get(delta_id, ("Guidance Kit", ()))
        hit = {path for d, path in reached if d == delta_id}
        if not hit:
            raise DeltaNotApplied(
                f"{label}: a branch with a LoRA/weight delta ran but none of its patched layers was reached (another "
                f"node replaced the layers' forward after this node, or the model calls these weights directly). "
                f"Put the Guidance Kit node last, after other model patches.")
        missed = [path for path in paths if path not in hit]
        if missed:
            raise DeltaNotApplied(_missed_layers_message(label, missed, len(paths)))
    return out


# Layer classes whose output is computed by their own forward (the delta is added there). Newer ComfyUI's
# mixed-precision layers (comfy.ops.MixedPrecisionOp: fp8 scaled, NVFP4, MXFP8, INT8 checkpoints) are
# torch.nn.Module subclasses, not nn.Linear, and still run through their forward.
def delta_layer_classes() -> tuple[type, ...]:
    import comfy.ops

    known: tuple[type, ...] = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    mixed = getattr(comfy.ops, "MixedPrecisionOp", None)
    return known + ((mixed,) if isinstance(mixed, type) else ())


def install_delta(model_patcher, delta_id: str, entries: dict[str, list[DeltaEntry]], label: str = "") -> None:
    """Install the layer patches of delta ``delta_id`` on a (cloned) ModelPatcher."""
    import comfy.utils

    for module_path, items in entries.items():
        path = module_path + ".forward"
        current = model_patcher.object_patches.get(path)
        if isinstance(current, DeltaForward):
            patch = current.with_entries(delta_id, items)
        else:
            patch = DeltaForward(comfy.utils.get_attr(model_patcher.model, module_path), {delta_id: items},
                                 previous=current, path=module_path)
        model_patcher.add_object_patch(path, patch)
    to = model_patcher.model_options.setdefault("transformer_options", {})
    layers = dict(to.get(DELTA_LAYERS_KEY) or {})
    layers[delta_id] = (label or delta_id.split("/")[0], tuple(sorted(entries)))
    to[DELTA_LAYERS_KEY] = layers
    installer.wrapper(model_patcher, DELTA_WRAPPER_KEY, delta_wrapper)


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
