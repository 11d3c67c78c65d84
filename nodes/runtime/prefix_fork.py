"""Perturbed branches share the unperturbed prefix of the network: the prefix runs once, the branch forks after it.

A block perturbation's branch (PAG, SEG, TPG, skip-layer, S²-Guidance) is its source chunk (the cond) bit for bit
until its first perturbed block. The network is cut into *units* in execution order (``ForkLayout``): DiT blocks
(``("double", i)`` then ``("single", i)``), and on UNets every ResBlock, down/upsampler and input conv and each
spatial transformer's projections and transformer layers ``(group, block, layer)``. Each unit before a branch's
first perturbed one is hooked:

* DiTs: ``PrefixForkBlock``, a ``DitBlockHook`` in ``patches_replace["dit"]`` (outermost, so the block's own
  contributors see the rows it runs);
* UNets: ``PrefixForkUnit``, an object patch of the unit module's ``forward`` (the module tree and weight keys
  stay unchanged; nothing is mutated in place).

Per forward, an APPLY_MODEL wrapper builds a ``ForkState`` from the forward's chunks and branch map: each branch
whose effect says which blocks it perturbs (``perturbed_blocks(noise_key)``) and whose source chunk runs in the
same forward forks at its first perturbed unit. A hooked unit runs only the rows of the chunks that have not been
left out (``cond_or_uncond`` of the call narrowed to them, so every other hook inside finds its rows) and gives
the left-out branch rows the output of their source rows (a copy of row ranges). A UNet spatial transformer wholly
before every fork of the forward runs as one unit (``ForkLayout.spans``: one gather, its norm narrowed too); where
a fork lies inside it, its units decide one by one. Several branches fork at their own units.

Where the fork cannot be placed the branch runs as before and the run's report says which and why: a branch
whose source chunk is not in the forward (ComfyUI split the batch, or the branch's conditioning appears more
than once), another node's patch on a prefix block, a unit that another node took over (the sharing stops
there), a batch that folds frames into rows. ``set_enabled(model_patcher, False)`` or the environment variable
``GUIDANCE_KIT_PREFIX_FORK=0`` turns the sharing off (the equality tests, debugging).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from .engine import EvaluationHook, add_evaluation_hook
from .rows import BRANCH_MAP_KEY, Forward, chunk_rows, current_options, published
from .slots import DitBlockHook, ModulePatch

FORK_KEY = "guidance_kit_prefix_fork"  # transformer_options of a forward: its ForkState
LOG_KEY = "guidance_kit_prefix_fork_log"  # transformer_options of a batched evaluation: the run's ForkLog
SETTING_KEY = "guidance_kit_prefix_fork_enabled"  # transformer_options (from model_options): False = off
ENVIRONMENT = "GUIDANCE_KIT_PREFIX_FORK"
WRAPPER_KEY = "guidance_kit_prefix_fork"
# per-forward states of other contributors that hold row indices of the full batch, read inside the blocks
# (transformer_options key → who): with one of them in the forward, no unit runs a narrowed batch
FULL_BATCH_ROW_STATES = {"guidance_kit_nag": "NAG", "guidance_kit_delta_rows": "a weight-delta branch"}


def set_enabled(model_patcher, enabled: bool) -> None:
    """Turn the prefix sharing on or off for this (cloned) model; on by default."""
    model_patcher.model_options.setdefault("transformer_options", {})[SETTING_KEY] = bool(enabled)


def enabled_in(transformer_options: dict) -> bool:
    return transformer_options.get(SETTING_KEY, True) is not False and os.environ.get(ENVIRONMENT, "1") != "0"


# ------------------------------------------------------------------------------------------------
# the units of a network, in execution order
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ForkLayout:
    """The model's units in execution order: ``units`` (keys) and, on UNets, ``paths`` (their modules) and
    ``spans``: (path, first, last) of each module that runs the units ``first``…``last`` and nothing else of
    weight (a spatial transformer: its norm, projections and layers); before every fork it runs as one unit (one
    gather instead of one per unit inside)."""

    units: tuple = ()
    paths: tuple = ()
    spans: tuple = ()

    @property
    def index(self) -> dict:
        return {key: i for i, key in enumerate(self.units)}

    def describe(self, position: int) -> str:
        key = self.units[position]
        return " ".join(str(part) for part in key)


def dit_layout(layout) -> ForkLayout:
    """DiT blocks: the double (joint) blocks, then the single blocks (``BlockLayout.dit_blocks``)."""
    units = [("double", i) for i in range(layout.dit_blocks.get("double", 0))]
    units += [("single", i) for i in range(layout.dit_blocks.get("single", 0))]
    return ForkLayout(tuple(units))


def unet_layout(net) -> ForkLayout:
    """UNet units: input conv, ResBlocks, down/upsamplers and the projections and transformer layers of spatial
    transformers, in the order ``forward_timestep_embed`` and ``SpatialTransformer.forward`` run them. Other
    children (video layers, unknown modules) are not units: they run on every row."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample, VideoResBlock

    units, paths, spans = [], [], []
    groups = (("input", list(net.input_blocks)), ("middle", [net.middle_block]), ("output", list(net.output_blocks)))
    for group, blocks in groups:
        for b, block in enumerate(blocks):
            prefix = "diffusion_model.middle_block" if group == "middle" else f"diffusion_model.{group}_blocks.{b}"
            for c, layer in enumerate(block):
                if type(layer) is SpatialTransformer:  # its projections (matmuls) and layers; not its norm
                    spans.append((f"{prefix}.{c}", len(units), len(units) + len(layer.transformer_blocks) + 1))
                    units.append((group, b, f"proj_in {c}"))
                    paths.append(f"{prefix}.{c}.proj_in")
                    for t in range(len(layer.transformer_blocks)):
                        units.append((group, b, t))
                        paths.append(f"{prefix}.{c}.transformer_blocks.{t}")
                    units.append((group, b, f"proj_out {c}"))
                    paths.append(f"{prefix}.{c}.proj_out")
                elif (isinstance(layer, (ResBlock, Downsample, Upsample)) and not isinstance(layer, VideoResBlock)) \
                        or (group == "input" and b == 0 and isinstance(layer, torch.nn.Conv2d)):
                    units.append((group, b, f"layer {c}"))
                    paths.append(f"{prefix}.{c}")
    return ForkLayout(tuple(units), tuple(paths), tuple(spans))


# ------------------------------------------------------------------------------------------------
# per forward: which rows each unit runs
# ------------------------------------------------------------------------------------------------

@dataclass
class Fork:
    label: str
    entry: int
    source: int
    at: int  # the unit index of its first perturbed block
    shared: set = field(default_factory=set)  # units it did not compute


@dataclass
class Selection:
    """The rows one unit runs (``kept``), the chunks they are, and each full row's row in the unit's output."""

    kept: torch.Tensor | slice  # a slice where the kept rows are one range (a view, no copy)
    gather: tuple  # (start, stop) ranges of the unit's output rows that, concatenated, are the full batch
    chunks: list  # positions of the kept chunks in the forward's ``cond_or_uncond``
    left_out: tuple

    @property
    def count(self) -> int:
        return self.kept.stop - self.kept.start if isinstance(self.kept, slice) else self.kept.numel()


class ForkState:
    """One forward's forks (built by ``ForkWrapper``); the hooked units ask it which rows to run."""

    def __init__(self, layout: ForkLayout, batch_size: int, chunks: list, forks: list[Fork]):
        self.layout = layout
        self.batch_size = batch_size
        self.chunks = list(chunks)
        self.forks = forks
        self.spans = dict(chunk_rows(chunks, batch_size))
        self.seen = -1  # the last unit that ran through us
        self.stopped_at: int | None = None  # the sharing stopped (a unit was bypassed or blocked)
        self.notes: list[tuple[str, str]] = []
        self.inside = 0  # > 0 while a span unit runs its units narrowed (their own hooks then pass through)
        self._selections: dict = {}

    def stop(self, position: int, reason: str) -> None:
        if self.stopped_at is None:
            self.stopped_at = position
            for fork in self.forks:
                if fork.at > position:
                    self.notes.append((fork.label, f"{fork.label} computes its prefix from "
                                                   f"{self.layout.describe(position)} on: {reason}"))

    def enter_span(self, first: int, last: int, rows: int, options: dict, foreign: str = "") -> Selection | None:
        """A module that runs the units ``first``…``last`` is about to run: the rows it runs, when it can run them
        as one unit (every branch left out at ``first`` stays left out after ``last``); None: its units decide,
        each on its own (nothing recorded here)."""
        if self.stopped_at is not None or self.seen != first - 1 or foreign or rows != self.batch_size:
            return None
        left_out = tuple(f for f in self.forks if f.at > first)
        if not left_out or any(f.at <= last for f in left_out) or \
                any(options.get(key) is not None for key in FULL_BATCH_ROW_STATES):
            return None
        self.seen = last
        for fork in left_out:
            fork.shared.update(range(first, last + 1))
        return self._selection(left_out)

    def enter(self, position: int, rows: int, options: dict, foreign: str = "") -> Selection | None:
        """Unit ``position`` is about to run on ``rows`` rows: the rows it runs (None: all)."""
        previous, self.seen = self.seen, position
        if self.stopped_at is not None:
            return None
        if previous != position - 1:
            self.stop(position, f"{self.layout.describe(position - 1)} did not run through Guidance Kit's hook "
                                f"(another node replaced it)")
            return None
        left_out = tuple(f for f in self.forks if f.at > position)
        if not left_out:
            return None
        if foreign:
            self.stop(position, f"another node's patch ({foreign}) is on this block")
            return None
        holders = [who for key, who in FULL_BATCH_ROW_STATES.items() if options.get(key) is not None]
        if holders:
            self.stop(position, f"{' and '.join(holders)} in the same forward reads rows of the whole batch inside "
                                f"the blocks")
            return None
        if rows != self.batch_size:
            self.stop(position, f"this unit runs {rows} rows for a batch of {self.batch_size} (frames folded into "
                                f"the batch)")
            return None
        for fork in left_out:
            fork.shared.add(position)
        return self._selection(left_out)

    def _selection(self, left_out: tuple) -> Selection:
        key = tuple(f.entry for f in left_out)
        selection = self._selections.get(key)
        if selection is None:
            selection = self._selections[key] = self._select(left_out)
        return selection

    def _select(self, left_out: tuple) -> Selection:
        dropped = {f.entry for f in left_out}
        kept_rows, position_of = [], {}
        for entry, span in self.spans.items():
            if entry in dropped:
                continue
            for row in range(span.start, span.stop):
                position_of[row] = len(kept_rows)
                kept_rows.append(row)
        gather = list(range(self.batch_size))
        for fork in left_out:
            span, source = self.spans[fork.entry], self.spans[fork.source]
            for offset in range(span.stop - span.start):
                gather[span.start + offset] = source.start + offset
        first = kept_rows[0]
        contiguous = kept_rows == list(range(first, first + len(kept_rows)))
        return Selection(kept=slice(first, first + len(kept_rows)) if contiguous else torch.tensor(kept_rows),
                         gather=ranges([position_of[row] for row in gather]),
                         chunks=[i for i, entry in enumerate(self.chunks) if entry not in dropped], left_out=left_out)


def ranges(rows: list[int]) -> tuple:
    """``rows`` as (start, stop) ranges of consecutive rows, in order."""
    out: list[list[int]] = []
    for row in rows:
        if out and out[-1][1] == row:
            out[-1][1] += 1
        else:
            out.append([row, row + 1])
    return tuple((start, stop) for start, stop in out)


def _branch_forks(layout: ForkLayout, forward: Forward) -> tuple[list[Fork], list[tuple[str, str]]]:
    """The forks of this forward's branches, and why a branch that could fork does not."""
    chunks = forward.chunks or []
    branch_map = forward.branch_map
    index = layout.index
    forks, notes = [], []
    for entry, branch in branch_map.items():
        effect = branch.perturbation
        perturbed = getattr(effect, "perturbed_blocks", None)
        if perturbed is None or entry not in chunks:
            continue
        label = branch.name
        source = 0 if branch.source == "cond" else 1
        positions = [index[k] for k in perturbed(forward.noise_key) if k in index]
        if not positions:
            notes.append((label, f"{label} perturbs no block of this model's unit list; its branch runs whole"))
            continue
        at = min(positions)
        if at == 0:
            continue  # its first block is perturbed: nothing to share
        if chunks.count(entry) != 1 or chunks.count(source) != 1:
            notes.append((label, f"{label}: its conditioning or its source's runs as several chunks in one forward "
                                 f"(several conditioning entries, or ComfyUI split the batch), so the branch cannot "
                                 f"take its source's rows; it computes its prefix"))
            continue
        if source in branch_map:
            notes.append((label, f"{label}: its source chunk is itself a branch; it computes its prefix"))
            continue
        forks.append(Fork(label, entry, source, at))
    return forks, notes


@dataclass(eq=False)
class ForkLog:
    """What the forks of one batched evaluation did (the engine's ``EvaluationHook`` recorder)."""

    shared: dict = field(default_factory=dict)  # label → (fork unit, units shared)
    notes: dict = field(default_factory=dict)  # label → why it did not (fully) share


class ForkWrapper:
    """APPLY_MODEL wrapper: the forward's ``ForkState``, published to the hooked units."""

    def __init__(self, layout: ForkLayout):
        self.layout = layout

    def __deepcopy__(self, memo) -> ForkWrapper:
        return self

    def __call__(self, executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options")
        if not isinstance(options, dict) or not options.get(BRANCH_MAP_KEY) or not options.get("cond_or_uncond"):
            return executor(x, t, *args, **kwargs)
        log: ForkLog | None = options.get(LOG_KEY)
        forward = Forward(options, x.shape[0])
        forks, notes = _branch_forks(self.layout, forward)
        if forks and not enabled_in(options):
            notes += [(f.label, f"{f.label}: prefix sharing is off (GUIDANCE_KIT_PREFIX_FORK=0 or the model's "
                                f"setting); it computes its prefix") for f in forks]
            forks = []
        if not forks:
            self._record(log, notes, [])
            return executor(x, t, *args, **kwargs)
        state = ForkState(self.layout, x.shape[0], forward.chunks, forks)
        with published(options, {FORK_KEY: state}):
            result = executor(x, t, *args, **kwargs)
        self._record(log, notes + state.notes, forks)
        return result

    def _record(self, log: ForkLog | None, notes, forks) -> None:
        if log is None:
            return
        for label, note in notes:
            log.notes.setdefault(label, note)
        for fork in forks:
            log.shared[fork.label] = (self.layout.describe(fork.at), len(fork.shared), fork.at)


# ------------------------------------------------------------------------------------------------
# running a unit on the kept rows
# ------------------------------------------------------------------------------------------------

def take_rows(value, kept: torch.Tensor | slice, n: int):
    """``value`` with every per-row tensor (first dimension ``n``) reduced to the rows ``kept``."""
    if torch.is_tensor(value):
        if not value.ndim or value.shape[0] != n:
            return value
        return value[kept] if isinstance(kept, slice) else value.index_select(0, kept.to(value.device))
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, kept, n) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, kept, n) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: take_rows(getattr(value, f.name), kept, n)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def expand_rows(value, gather: tuple, m: int):
    """The unit's output on ``m`` rows as the full batch: its row ranges ``gather`` concatenated (one copy of the
    rows; a range copy is cheaper than a per-row gather)."""
    if torch.is_tensor(value):
        if not value.ndim or value.shape[0] != m:
            return value
        return torch.cat([value[start:stop] for start, stop in gather])
    if isinstance(value, (tuple, list)):
        return type(value)(expand_rows(v, gather, m) for v in value)
    if isinstance(value, dict):
        return {k: expand_rows(v, gather, m) for k, v in value.items()}
    return value


PER_CHUNK_KEYS = ("cond_or_uncond", "uuids")  # ComfyUI's per-chunk lists of a forward's transformer_options


def _narrowed(options: dict, selection: Selection) -> dict:
    """The unit's options: ComfyUI's per-chunk lists narrowed to the kept chunks."""
    local = dict(options)
    for key in PER_CHUNK_KEYS:
        value = options.get(key)
        if isinstance(value, list) and len(value) == len(options["cond_or_uncond"]):
            local[key] = [value[i] for i in selection.chunks]
    return local


def _merge_back(options: dict, local: dict) -> None:
    """What the unit's hooks wrote into their options (e.g. the joint text length) for the units after it."""
    for key, value in local.items():
        if key not in PER_CHUNK_KEYS and options.get(key, local) is not value:
            options[key] = value


def _foreign(previous) -> str:
    if previous is None or getattr(previous, "is_guidance_kit", False):
        return ""
    return getattr(type(previous), "__qualname__", type(previous).__name__)


class PrefixForkBlock(DitBlockHook):
    """A DiT block before some branch's fork: it runs the kept rows only (then its contributors, as a
    ``DitBlockHook``), and the left-out branch rows get their source rows' output."""

    position: int = 0

    def __call__(self, args, extra):
        options = args.get("transformer_options")
        state = options.get(FORK_KEY) if isinstance(options, dict) else None
        img = args.get("img")
        if state is None or not torch.is_tensor(img):
            return DitBlockHook.__call__(self, args, extra)
        selection = state.enter(self.position, img.shape[0], options, _foreign(self.previous))
        if selection is None:
            return DitBlockHook.__call__(self, args, extra)
        n = img.shape[0]
        local = _narrowed(options, selection)
        sliced = {k: local if k == "transformer_options" else take_rows(v, selection.kept, n) for k, v in args.items()}
        with published(local, {}):
            out = DitBlockHook.__call__(self, sliced, extra)
        _merge_back(options, local)
        return expand_rows(out, selection.gather, selection.count)


class PrefixForkUnit(ModulePatch):
    """Object patch of a UNet unit's ``forward`` before some branch's fork (ResBlock, sampler, input conv,
    transformer layer), or of a module that runs the units ``position``…``last`` (``ForkLayout.spans``): it runs
    the kept rows only; the left-out branch rows get their source rows' output."""

    is_guidance_kit = True

    def __init__(self, module, position: int, previous=None, last: int | None = None, inner: tuple = ()):
        super().__init__(module, previous)
        self.position = position
        self.last = position if last is None else last
        self.inner = inner  # a span's unit modules: each must run our hook, on no other node's patch

    def _inner_foreign(self) -> str:
        for module in self.inner:
            hook = module.__dict__.get("forward")
            if not isinstance(hook, PrefixForkUnit):
                return "a unit inside was replaced"
            if _foreign(hook.previous):
                return _foreign(hook.previous)
        return ""

    def __call__(self, x, *args, **kwargs):
        published_options = current_options()
        state = published_options.get(FORK_KEY)
        if state is None or state.inside or not torch.is_tensor(x):  # inside: a span unit already runs narrowed
            return self.original(x, *args, **kwargs)
        options = kwargs.get("transformer_options")
        if not isinstance(options, dict):  # passed by position (a spatial transformer's call), or not at all
            options = next((a for a in args if isinstance(a, dict) and "cond_or_uncond" in a), published_options)
        n, foreign = x.shape[0], _foreign(self.previous)
        if self.last > self.position:
            selection = state.enter_span(self.position, self.last, n, options, foreign or self._inner_foreign())
            if selection is None:
                return self.original(x, *args, **kwargs)
        else:
            selection = state.enter(self.position, n, options, foreign)
            if selection is None:
                return self.original(x, *args, **kwargs)
        local = _narrowed(options, selection)
        args = tuple(local if a is options else take_rows(a, selection.kept, n) for a in args)
        kwargs = {k: (local if v is options else take_rows(v, selection.kept, n)) for k, v in kwargs.items()}
        state.inside += 1
        try:
            with published(local, {}):
                out = self.original(take_rows(x, selection.kept, n), *args, **kwargs)
        finally:
            state.inside -= 1
        _merge_back(options, local)
        return expand_rows(out, selection.gather, selection.count)


# ------------------------------------------------------------------------------------------------
# installation and the run's report
# ------------------------------------------------------------------------------------------------

def fork_layout(model_patcher, spec, layout) -> ForkLayout:
    from .families import diffusion_model_of

    return unet_layout(diffusion_model_of(model_patcher)) if spec.is_unet else dit_layout(layout)


def install(model_patcher, spec, layout, blocks, latest: bool = False) -> None:
    """Hook the units before the first of ``blocks`` (``latest``: before the last of them, for branches whose
    perturbed blocks change per step: S²-Guidance's dropped blocks) on a cloned ModelPatcher (idempotent)."""
    from . import install as installer

    units = fork_layout(model_patcher, spec, layout)
    positions = [units.index[k] for k in blocks if k in units.index]
    if not positions:
        return
    upto = max(positions) if latest else min(positions)
    if upto == 0:
        return
    if spec.is_unet:
        _hook_unet_units(model_patcher, units, upto)
    elif spec.block_hook == "dit":
        _hook_dit_blocks(model_patcher, spec, units, upto)
    # other DiTs run their blocks through object patches of the blocks' forward (Lumina2, Cosmos, HiDream): no
    # block-replace entry is on their path, so nothing is hooked and the run's report says the branch runs whole
    installer.wrapper(model_patcher, WRAPPER_KEY, ForkWrapper(units))
    add_evaluation_hook(model_patcher, FORK_REPORT)


def _hook_dit_blocks(model_patcher, spec, units: ForkLayout, upto: int) -> None:
    replace = model_patcher.model_options.setdefault("transformer_options", {}).setdefault("patches_replace", {})
    dit = dict(replace.get("dit", {}))
    for position in range(upto):
        group, index = units.units[position]
        patch_key = (f"{group}_block", index)
        current = dit.get(patch_key)
        if isinstance(current, PrefixForkBlock):
            continue
        if isinstance(current, DitBlockHook):  # ours: the fork goes outside its contributors
            hook = PrefixForkBlock(current.spec, current.key, previous=current.previous,
                                   contributors=current.contributors)
        else:
            hook = PrefixForkBlock(spec, (group, index), previous=current)
        hook.position = position
        dit[patch_key] = hook
    replace["dit"] = dit


def _hook_unet_units(model_patcher, units: ForkLayout, upto: int) -> None:
    hooks = [(path, position, position) for position, path in enumerate(units.paths[:upto])]
    hooks += [(path, first, last) for path, first, last in units.spans if last < upto]
    for path, first, last in hooks:
        _hook_unet_unit(model_patcher, units, path, first, last)


def _hook_unet_unit(model_patcher, units: ForkLayout, path: str, first: int, last: int) -> None:
    import comfy.utils

    current = model_patcher.object_patches.get(f"{path}.forward")
    occupant = current
    while occupant is not None and not isinstance(occupant, PrefixForkUnit):
        occupant = getattr(occupant, "previous", None)
    if occupant is not None:
        return
    module = comfy.utils.get_attr(model_patcher.model, path)
    inner = tuple(comfy.utils.get_attr(model_patcher.model, p) for p in units.paths[first:last + 1]) \
        if last > first else ()
    model_patcher.add_object_patch(f"{path}.forward", PrefixForkUnit(module, first, previous=current, last=last,
                                                                     inner=inner))


def installed(model_patcher) -> bool:
    import comfy.patcher_extension

    return bool(model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY))


class ForkReport(EvaluationHook):
    """The engine's evaluation hook: a ``ForkLog`` per batched evaluation, its lines in the run's report."""

    KEY = LOG_KEY

    def begin(self, plan, position, sigma, x, guided: bool):
        return ForkLog()

    def finish(self, plan, recorder: ForkLog, model_options: dict, run) -> dict:
        for label, (unit, shared, _) in recorder.shared.items():
            if not shared:  # the hooked units never ran narrowed: this family's blocks do not go through them
                run.notes[f"prefix:{label}"] = (f"{label}'s branch runs whole (no prefix shared): no block before "
                                                f"its fork at {unit} ran through the fork's hooks on this family")
                continue
            run.notes[f"prefix:{label}"] = (f"{label}'s branch forks at {unit} and takes the {shared} units before "
                                            f"it from the cond rows (prefix shared)")
        for label, note in recorder.notes.items():
            run.notes[f"prefix:{label}"] = note
        return {}


FORK_REPORT = ForkReport()
