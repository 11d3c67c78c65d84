"""Chunk-selective model perturbations for extra guidance branches.

The engine batches cond, uncond and every extra branch in one forward. A branch that needs a
degraded model (perturbed attention, shuffled tokens, ...) marks its chunk in
``transformer_options[BRANCH_MAP_KEY]`` (index into the conds list → Branch); ComfyUI records
which chunk of the batch belongs to which conds-list index in ``transformer_options["cond_or_uncond"]``,
also when it splits the batch under memory pressure. Hooks use both to act on the branch's rows
only, so cond and uncond rows run the unperturbed model in the same forward.

A branch's ``perturbation`` object may implement

    attention(func, q, k, v, *args, **kwargs) -> Tensor

which replaces the attention computation for its rows in every attention call that receives
``transformer_options`` (all block-hook DiTs and the UNet; see COMFYUI_HOOKS.md §3). ``func`` is
the selected attention backend, q/k/v/masks are already sliced to the branch's rows.
"""

from __future__ import annotations

import torch

from .engine import BRANCH_MAP_KEY

OVERRIDE_KEY = "optimized_attention_override"


def rows_by_perturbation(transformer_options: dict, batch_size: int) -> dict[int, list[int]]:
    """Map id(perturbation) → batch rows of the chunks whose branch carries that perturbation."""
    branch_map = transformer_options.get(BRANCH_MAP_KEY)
    chunks = transformer_options.get("cond_or_uncond")
    if not branch_map or not chunks:
        return {}
    per_chunk = batch_size // len(chunks)
    if per_chunk * len(chunks) != batch_size:
        raise RuntimeError(f"Guidance Kit: batch of {batch_size} rows does not split into {len(chunks)} chunks")
    rows: dict[int, list[int]] = {}
    for chunk, index in enumerate(chunks):
        branch = branch_map.get(index)
        if branch is None or branch.perturbation is None:
            continue
        rows.setdefault(id(branch.perturbation), []).extend(range(chunk * per_chunk, (chunk + 1) * per_chunk))
    return rows


def _perturbations(transformer_options: dict) -> dict[int, object]:
    return {id(b.perturbation): b.perturbation for b in transformer_options.get(BRANCH_MAP_KEY, {}).values()
            if b.perturbation is not None}


def _slice_rows(value, rows: torch.Tensor, batch_size: int):
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch_size:
        return value.index_select(0, rows)
    return value


class AttentionDispatcher:
    """``optimized_attention_override`` that routes branch rows to their perturbation.

    Installed once per model; chains to the override that was there before (another pack's),
    which still handles every unperturbed row.
    """

    is_guidance_kit = True

    def __init__(self, previous=None):
        self.previous = previous

    def _call(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        q = args[0]
        batch_size = q.shape[0]
        rows = rows_by_perturbation(transformer_options, batch_size)
        perturbations = _perturbations(transformer_options)
        rows = {k: r for k, r in rows.items() if hasattr(perturbations[k], "attention")}
        if not rows:
            return self._call(func, *args, **kwargs)
        out = None
        taken = torch.zeros(batch_size, dtype=torch.bool)
        for key, row_list in rows.items():
            index = torch.tensor(row_list, device=q.device)
            part_args = [_slice_rows(a, index, batch_size) for a in args]
            part_kwargs = {k: _slice_rows(v, index, batch_size) for k, v in kwargs.items()}
            part = perturbations[key].attention(func, *part_args, **part_kwargs)
            if out is None:
                out = part.new_empty((batch_size,) + tuple(part.shape[1:]))
            out[index] = part
            taken[row_list] = True
        rest = (~taken).nonzero().flatten().tolist()
        if rest:
            index = torch.tensor(rest, device=q.device)
            part_args = [_slice_rows(a, index, batch_size) for a in args]
            part_kwargs = {k: _slice_rows(v, index, batch_size) for k, v in kwargs.items()}
            out[index] = self._call(func, *part_args, **part_kwargs)
        return out


def install_attention_dispatcher(model_patcher) -> None:
    """Make branch attention perturbations reachable on a (cloned) model; idempotent."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    current = to.get(OVERRIDE_KEY)
    if not getattr(current, "is_guidance_kit", False):
        to[OVERRIDE_KEY] = AttentionDispatcher(previous=current)
