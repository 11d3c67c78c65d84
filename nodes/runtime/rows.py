"""Which rows of a forward belong to which branch, and where a forward is in its run (σ, progress, step).

The engine runs cond, uncond and every extra branch as entries of one ``calc_cond_batch`` call and records
entry index → Branch in ``transformer_options[BRANCH_MAP_KEY]``; ComfyUI records the entry of each chunk
of the batch in ``transformer_options["cond_or_uncond"]`` (also when it splits the batch under memory
pressure). ``Forward`` reads both, for every hook of the pack: one chunk → rows resolver (``chunk_rows``,
which raises on a batch that does not split into its chunks), the branch rows per effect, the prompt's
rows, and the forward's noise key (computed once per forward). Per-forward state lives in the forward's
transformer_options; the object patches of modules (which see no transformer_options) find them through
``published`` / ``current_options`` (a ContextVar: per thread and call). ``StepClock`` keeps a run's sigmas
(converted once per sampler call) and gives a step's ``StepPosition``.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from ...guiders.progress import FROM_NOISE_PERCENT, StepPosition, percent_of_sigma, sigma_key, step_in_call

BRANCH_MAP_KEY = "guidance_kit_branches"  # transformer_options: entry index → Branch
NOISE_KEY = "guidance_kit_noise_key"  # transformer_options: (sigmas tensor, its sigma_key), per forward


def chunk_rows(chunks, batch_size: int) -> list[tuple[int, slice]]:
    """(entry, rows) of each chunk of a batch of ``batch_size`` rows made of ``chunks`` (``cond_or_uncond``)."""
    per_chunk = batch_size // len(chunks)
    if per_chunk * len(chunks) != batch_size:
        raise RuntimeError(f"Guidance Kit: a batch of {batch_size} rows does not split into {len(chunks)} chunks")
    return [(entry, slice(i * per_chunk, (i + 1) * per_chunk)) for i, entry in enumerate(chunks)]


def fold_rows(rows: torch.Tensor, batch_size: int, n: int) -> torch.Tensor | None:
    """``rows`` of a batch as rows of a tensor of ``n`` rows that folds each sample into n / batch_size rows,
    sample-major (frames or groups: (b, k) → b·k); None when ``n`` is not a multiple of the batch."""
    if n == batch_size:
        return rows
    if n % batch_size == 0:
        k = n // batch_size
        return (rows[:, None] * k + torch.arange(k)[None, :]).reshape(-1)
    return None


class Forward:
    """One forward's ``transformer_options`` as the hooks read them (``batch_size``: rows of its input)."""

    __slots__ = ("options", "batch_size")

    def __init__(self, transformer_options: dict | None, batch_size: int):
        self.options = transformer_options if isinstance(transformer_options, dict) else {}
        self.batch_size = batch_size

    @property
    def chunks(self) -> list | None:
        return self.options.get("cond_or_uncond") or None

    @property
    def branch_map(self) -> dict:
        return self.options.get(BRANCH_MAP_KEY) or {}

    def entry_rows(self, wanted: Callable[[int], bool] = lambda entry: True) -> list[tuple[int, slice]]:
        """(entry, rows) of the chunks whose entry ``wanted`` takes (0 = cond, 1 = uncond, 2... = branches)."""
        chunks = self.chunks
        if not chunks:
            return []
        return [(entry, rows) for entry, rows in chunk_rows(chunks, self.batch_size) if wanted(entry)]

    @property
    def chunk_size(self) -> int:
        """Rows per chunk (the forward has chunks)."""
        spans = chunk_rows(self.chunks, self.batch_size)
        return spans[0][1].stop - spans[0][1].start

    def prompt_rows(self) -> torch.Tensor | None:
        """Rows of the chunks that carry the positive prompt (entry 0); None when there are none."""
        rows = [row for _, span in self.entry_rows(lambda entry: entry == 0) for row in range(span.start, span.stop)]
        return torch.tensor(rows, dtype=torch.long) if rows else None

    def branch_rows(self, accept: Callable[[object], bool], key: Callable[[object], Hashable] | None = None
                    ) -> list[tuple[object, torch.Tensor]]:
        """(effect, row indices) for the branches of this forward whose effect (``Branch.perturbation``) ``accept``
        takes; the rows of effects with the same ``rows_key()`` (or ``key``) are gathered together."""
        branch_map = self.branch_map
        if not branch_map or not self.chunks:
            return []
        rows: dict = {}
        for entry, span in chunk_rows(self.chunks, self.batch_size):
            branch = branch_map.get(entry)
            effect = branch.perturbation if branch is not None else None
            if effect is None or not accept(effect):
                continue
            group = effect.rows_key() if key is None else key(effect)
            rows.setdefault(group, (effect, []))[1].extend(range(span.start, span.stop))
        return [(effect, torch.tensor(r, dtype=torch.long)) for effect, r in rows.values()]

    def of_type(self, cls: type) -> list[tuple[object, torch.Tensor]]:
        return self.branch_rows(lambda effect: isinstance(effect, cls))

    @property
    def sigma(self) -> float | None:
        sigma = self.options.get("sigmas")
        return None if sigma is None else sigma_value(sigma)

    @property
    def noise_key(self) -> int:
        """An integer for this forward's noise level (``guiders.progress.sigma_key``), to seed per-step random draws
        (S²-Guidance's dropped blocks, TPG's permutation, TSG's and ICG's noise): the same σ draws the same numbers
        in one sampler call and in a run split over several. Computed once per forward (one device sync)."""
        sigma = self.options.get("sigmas")
        if sigma is None:
            return 0
        cached = self.options.get(NOISE_KEY)
        if cached is not None and cached[0] is sigma:
            return cached[1]
        key = sigma_key(sigma_value(sigma))
        self.options[NOISE_KEY] = (sigma, key)
        return key


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("guidance_kit_forward", default=None)


@contextlib.contextmanager
def published(transformer_options: dict, state: dict):
    """For the duration of a model call: ``state`` under its keys in the call's transformer_options, and those
    options the current ones for the object patches of modules inside the call (``current_options``)."""
    token = _CURRENT.set(transformer_options)
    transformer_options.update(state)
    try:
        yield
    finally:
        for key in state:
            transformer_options.pop(key, None)
        _CURRENT.reset(token)


def current_options() -> dict:
    """The transformer_options of the model call in progress ({} outside one, or before any publication)."""
    options = _CURRENT.get()
    return options if options is not None else {}


# ------------------------------------------------------------------------------------------------
# σ and the run's steps
# ------------------------------------------------------------------------------------------------

def sigma_value(sigma) -> float:
    return float(torch.as_tensor(sigma).reshape(-1)[0])


def sigma_list(sigmas: torch.Tensor) -> list[float]:
    return [float(s) for s in sigmas.detach().float().cpu().tolist()]


_PERCENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model_sampling → {σ: percent} (a cache)


def sigma_progress(model_sampling, sigma: float) -> float:
    """ComfyUI's percent of ``sigma`` for this model_sampling (0 = σ_max, 1 = σ = 0): the progress every
    schedule and window of the pack is written over (``guiders/progress.py``). Cached per model_sampling
    object (a ModelSamplingFlux/SD3 node installs a new one, so a shift change is a new cache)."""
    try:
        cache = _PERCENTS.setdefault(model_sampling, {})
    except TypeError:  # not weak-referenceable: compute every time
        cache = {}
    value = cache.get(sigma)
    if value is None:
        value = percent_of_sigma(sigma, model_sampling.percent_to_sigma)
        if len(cache) > 4096:
            cache.clear()
        cache[sigma] = value
    return value


@dataclass
class StepClock:
    """A run's sampler-call sigmas (``sample_sigmas``, converted once per sampler call) and step positions."""

    sigmas: list[float] | None = None
    ref: object = None

    def call_sigmas(self, model_options: dict) -> list[float] | None:
        """This sampler call's sigmas (None for a sampler outside CFGGuider, which does not publish them)."""
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            return None
        if self.sigmas is None or self.ref is not sigmas:
            self.sigmas = sigma_list(sigmas)
            self.ref = sigmas
        return self.sigmas

    def position(self, model_options: dict, model, sigma) -> StepPosition:
        value = sigma_value(sigma)
        sampling = model.model_sampling
        progress = sigma_progress(sampling, value)
        sigmas = self.call_sigmas(model_options)
        if sigmas is None:
            # no schedule published (a sampler outside CFGGuider): progress still comes from σ; zero-init,
            # which needs the call's first steps, cannot act
            return StepPosition(progress=progress, step=0.0, n_steps=1, from_noise=False)
        from_noise = sigma_progress(sampling, sigmas[0]) <= FROM_NOISE_PERCENT
        return StepPosition(progress=progress, step=step_in_call(sigmas, value), n_steps=len(sigmas) - 1,
                            from_noise=from_noise, call_sigmas=tuple(sigmas))
