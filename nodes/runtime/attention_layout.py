"""ComfyUI's attention-call layouts: q/k/v as [B, L, H·D], [B, L, H, D] or (``skip_reshape``) [B, H, L, D],
outputs as [B, L, H·D] or (``skip_output_reshape``) [B, H, L, D]; views of a call restricted to some rows,
queries and keys (with its mask); and the row split and merge the contributors use."""

from __future__ import annotations

import torch


def tokens(t: torch.Tensor, kwargs: dict) -> int:
    """Token count of an attention input in ComfyUI's layouts."""
    return t.shape[2] if kwargs.get("skip_reshape", False) else t.shape[1]


def heads_of(args, kwargs) -> int:
    return kwargs["heads"] if "heads" in kwargs else args[3]


def mask_of(args, kwargs):
    return args[4] if len(args) > 4 else kwargs.get("mask")


def to_bhld(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return t
    if t.ndim == 4:  # [B, L, H, D]
        return t.transpose(1, 2)
    b, length, hd = t.shape
    return t.view(b, length, heads, hd // heads).transpose(1, 2)


def from_bhld(t: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    if skip_output_reshape:
        return t
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b, length, h * d)


def token_major(out: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    """An attention output as [B, L, channels of all heads] (NAG's norms run over a token's channels)."""
    if skip_output_reshape:  # [B, H, L, D]
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    return out


def from_token_major(out: torch.Tensor, skip_output_reshape: bool, heads: int) -> torch.Tensor:
    if skip_output_reshape:
        return out.reshape(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
    return out


def as_range(rows: torch.Tensor) -> slice | None:
    """``rows`` as a slice when they are one ascending range (a chunk's rows: views instead of copies)."""
    n = rows.numel()
    if not n or rows.ndim != 1:
        return None
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 != n or (n > 1 and not bool((rows[1:] - rows[:-1] == 1).all())):
        return None
    return slice(first, last + 1)


def select_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t``'s ``rows``: a view when they are one range, else a copy."""
    span = as_range(rows)
    return t[span] if span is not None else t.index_select(0, rows.to(t.device))


def take(value, rows: torch.Tensor, batch_size: int):
    """``value``'s ``rows`` when it is a per-row tensor of the batch, else ``value`` (a view when the rows are one
    range)."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch_size:
        return select_rows(value, rows)
    return value


def place(out, part, rows, batch_size):
    """Write ``part`` into the batch output ``out`` at ``rows`` (allocated on the first part)."""
    if out is None:
        out = part.new_empty((batch_size,) + tuple(part.shape[1:]))
    span = as_range(rows)
    if span is not None:
        out[span] = part
    else:
        out[rows.to(out.device)] = part
    return out


def split_rows(batch_size: int, groups, perturbed, rest):
    """``perturbed(effect, rows)`` for the rows of each (effect, rows) group, ``rest(rows)`` for the other rows
    (if any), merged into one batch output."""
    out = None
    taken = torch.zeros(batch_size, dtype=torch.bool)
    for effect, rows in groups:
        out = place(out, perturbed(effect, rows), rows, batch_size)
        taken[rows] = True
    others = (~taken).nonzero().flatten()
    if others.numel():
        out = place(out, rest(others), others, batch_size)
    return out


def attention_view(args, kwargs, query_index: torch.Tensor | None, key_index: torch.Tensor,
                   rows: torch.Tensor | None, total: int):
    """(args, kwargs) of an attention call restricted to some rows, queries and keys/values."""
    token_dim = 2 if kwargs.get("skip_reshape", False) else 1
    q, k, v = args[:3]
    batch_size = q.shape[0]
    if rows is not None:
        q, k, v = (t.index_select(0, rows.to(t.device)) for t in (q, k, v))
    if query_index is not None:
        q = q.index_select(token_dim, query_index.to(q.device))
    k = k.index_select(token_dim, key_index.to(k.device))
    v = v.index_select(token_dim, key_index.to(v.device))
    new_args = [q, k, v, *args[3:]]
    new_kwargs = dict(kwargs)
    mask = mask_of(args, kwargs)
    if torch.is_tensor(mask):
        mask = mask_view(mask, query_index, key_index, rows, batch_size, total)
        if len(args) > 4:
            new_args[4] = mask
        else:
            new_kwargs["mask"] = mask
    return tuple(new_args), new_kwargs


def mask_view(mask: torch.Tensor, query_index, key_index, rows, batch_size: int, total: int) -> torch.Tensor:
    """An attention mask ([Lk], [Lq, Lk], [B, Lq, Lk] or [B, H, Lq, Lk]; size-1 dims broadcast)
    restricted like its attention call."""
    if mask.shape[-1] == total:
        mask = mask.index_select(mask.ndim - 1, key_index.to(mask.device))
    elif mask.shape[-1] != 1:
        raise RuntimeError(f"Guidance Kit NAG: an attention mask of shape {tuple(mask.shape)} does not match the "
                           f"{total} keys of its attention call")
    if query_index is not None and mask.ndim >= 2 and mask.shape[-2] == total:
        mask = mask.index_select(mask.ndim - 2, query_index.to(mask.device))
    if rows is not None and mask.ndim >= 3 and mask.shape[0] == batch_size:
        mask = mask.index_select(0, rows.to(mask.device))
    return mask
