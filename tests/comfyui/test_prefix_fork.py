"""Prefix sharing (``nodes/runtime/prefix_fork.py``): a perturbed branch takes the blocks before its first
perturbed block from the cond rows. On every family of the harness, for every block perturbation, in fp32 and
bf16: the output equals the unshared run, and the prefix units really ran fewer rows; several branches fork at
their own blocks; where the fork cannot be placed the branch runs whole and the run's report says why."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import logging

import comfy.utils
import pytest
import torch

from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes.runtime import families, prefix_fork
from guidance_kit.nodes.runtime.blocks import block_layout
from guidance_kit.nodes.runtime.families import family_of
from tests.comfyui.harness import ALL_FAMILIES, NEW_FAMILIES, conditioning, ksample, out, rel_diff, tiny_model

STEPS = 4
CFG = 4.0
WHOLE_RUN = dict(schedule="constant", start_percent=0.0, end_percent=1.0)
# relative difference that counts as equal, fp32 and bf16 alike: the shared prefix runs the cond rows in a smaller
# batch, which on these CPU kernels gives bit-identical rows (measured: 0 on every case here, both dtypes)
SAME = 1e-5

METHODS = {
    "PAG": lambda m: out(P.PAGNode.execute(m, 3.0, "auto", **WHOLE_RUN)),
    "SEG": lambda m: out(P.SEGNode.execute(m, 3.0, 10.0, "auto", **WHOLE_RUN)),
    "TPG": lambda m: out(P.TPGNode.execute(m, 3.0, "auto", 0, **WHOLE_RUN)),
    "Skip-layer": lambda m: out(P.SkipLayerNode.execute(m, 2.8, "auto", **WHOLE_RUN)),
    "S2": lambda m: out(P.S2GuidanceNode.execute(m, 0.25, 0.6, "auto", 0, **WHOLE_RUN)),
}


def unit_modules(model) -> list:
    """The unit modules of the model, in the fork layout's order."""
    spec = family_of(model, "test")
    units = prefix_fork.fork_layout(model, spec, block_layout(model, spec))
    net = model.model.diffusion_model
    if spec.is_unet:
        return [comfy.utils.get_attr(model.model, path) for path in units.paths]
    attrs = dict(spec.groups)
    return [families.block_at(getattr(net, attrs[group]), index) for group, index in units.units]


def inner_module(unit):
    """The unit's first sub-module with weights (the unit's own call is patched, its inner modules are not); the
    unit itself when it is a leaf (its own call then shows the full batch: such units are left out)."""
    return next((m for m in unit.modules() if m is not unit and any(True for _ in m.parameters(recurse=False))), None)


def rows_per_unit(model, family: str, dtype=torch.float32) -> tuple[torch.Tensor, list[int]]:
    """Sample, recording the largest batch each unit (with inner modules) ran in any forward."""
    seen: dict[int, int] = {}
    hooks = []
    for i, unit in enumerate(unit_modules(model)):
        module = inner_module(unit)
        if module is None:
            continue

        def record(module, args, kwargs, i=i):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[i] = max(seen.get(i, 0), int(x.shape[0]))
        hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        result = ksample(model, family, CFG, STEPS)
    finally:
        for hook in hooks:
            hook.remove()
    return result, [seen[i] for i in sorted(seen)]


def shared_off(model):
    m = model.clone()
    prefix_fork.set_enabled(m, False)
    return m


def build(method: str, family: str, dtype=torch.float32):
    return METHODS[method](tiny_model(family, dtype=dtype))


REFUSED = {("sd3", "TPG")}  # SD3 has no rotary positions in its blocks: TPG refuses it at the node
CASES = [(f, m) for f in ALL_FAMILIES for m in METHODS if (f, m) not in REFUSED]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,method", CASES)
def test_prefix_shared_equals_unshared(family, method, dtype):
    model = build(method, family, dtype)
    assert prefix_fork.installed(model)
    shared, rows = rows_per_unit(model, family, dtype)
    whole, whole_rows = rows_per_unit(shared_off(model), family, dtype)
    assert bool(torch.isfinite(shared).all())
    difference = rel_diff(shared.float(), whole.float())
    print(f"{method} on {family} ({dtype}): shared vs whole {difference:.2e}; rows per unit {rows} vs {whole_rows}")
    assert difference <= SAME
    assert max(whole_rows) == 3 and set(rows) <= {2, 3}
    if method != "S2":  # S²'s first dropped block changes per step: its fork moves
        first = rows.index(3)
        assert first > 0 and rows[:first] == [2] * first and set(rows[first:]) == {3}, rows


def test_branches_fork_at_their_own_blocks():
    """PAG at the middle block and TPG's input levels on the UNet: each computes only from its own fork on."""
    model = out(P.TPGNode.execute(out(P.PAGNode.execute(tiny_model("sd15"), 3.0, "auto", **WHOLE_RUN)), 3.0, "auto",
                                  0, **WHOLE_RUN))
    shared, rows = rows_per_unit(model, "sd15")
    whole, _ = rows_per_unit(shared_off(model), "sd15")
    assert rel_diff(shared, whole) <= SAME
    assert rows[0] == 2 and 3 in rows and rows[-1] == 4, rows  # cond/uncond, + TPG from its fork, + PAG from its
    assert rows.index(3) < rows.index(4)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_with_nag_the_branch_computes_its_prefix_and_the_report_says_why(family, caplog):
    """NAG's per-forward state holds rows of the whole batch, read inside the blocks: no unit runs narrowed."""
    from guidance_kit.nodes.nag import NAGNode

    caplog.set_level(logging.INFO, logger="guidance_kit")
    model = out(P.PAGNode.execute(tiny_model(family), 3.0, "auto", **WHOLE_RUN))
    model = out(NAGNode.execute(model, conditioning(family, 3), 5.0, 2.5, 0.25, 0.0, 1.0, 0.0))
    shared, rows = rows_per_unit(model, family)
    whole, _ = rows_per_unit(shared_off(model), family)
    assert set(rows) == {3}
    assert rel_diff(shared, whole) <= SAME
    assert "NAG in the same forward reads rows of the whole batch" in report(caplog)


def test_the_full_batch_row_states_are_the_contributors_keys():
    from guidance_kit.nodes.contributors import nag, row_delta

    assert set(prefix_fork.FULL_BATCH_ROW_STATES) == {nag.NAG_KEY, row_delta.DELTA_ROWS_KEY}


def test_environment_variable_turns_it_off(monkeypatch):
    model = build("PAG", "flux")
    monkeypatch.setenv(prefix_fork.ENVIRONMENT, "0")
    _, rows = rows_per_unit(model, "flux")
    assert set(rows) == {3}


def report(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.name == "guidance_kit")


def test_the_run_report_names_the_fork(caplog):
    caplog.set_level(logging.INFO, logger="guidance_kit")
    ksample(build("PAG", "sd15"), "sd15", CFG, STEPS)
    assert "PAG's branch forks at middle 0 0" in report(caplog) and "prefix shared" in report(caplog)


def test_another_nodes_block_patch_falls_back_and_says_why(caplog):
    """A foreign occupant of a prefix block: the branch computes its prefix from there on, the report says so."""
    caplog.set_level(logging.INFO, logger="guidance_kit")
    calls = []

    def foreign(args, extra):
        calls.append(args["img"].shape[0])
        return extra["original_block"](args)

    base = tiny_model("flux")
    base.set_model_patch_replace(foreign, "dit", "double_block", 0)
    model = out(P.PAGNode.execute(base, 3.0, "auto", **WHOLE_RUN))
    shared, rows = rows_per_unit(model, "flux")
    whole, _ = rows_per_unit(shared_off(model), "flux")
    assert rel_diff(shared, whole) <= SAME
    assert set(calls) == {3} and rows[0] == 3
    assert "another node's patch" in report(caplog) and "PAG computes its prefix from double 0" in report(caplog)


def test_a_branch_in_another_forward_falls_back_and_says_why(caplog):
    """The prompt has two conditioning entries (several cond chunks): the branch cannot pick its source rows."""
    caplog.set_level(logging.INFO, logger="guidance_kit")
    model = build("PAG", "flux")
    positive = conditioning("flux", 1) + conditioning("flux", 4)
    ksample(model, "flux", CFG, STEPS, positive=positive)
    shared = ksample(model, "flux", CFG, STEPS, positive=positive)
    whole = ksample(shared_off(model), "flux", CFG, STEPS, positive=positive)
    assert rel_diff(shared, whole) <= SAME
    assert "runs as several chunks" in report(caplog)


def test_a_shared_block_sees_its_own_rows_chunks_and_uuids():
    """Inside a shared unit, ComfyUI's per-chunk lists name the kept chunks only (every hook finds its rows)."""
    model = build("PAG", "flux")
    seen = []

    def record(module, args, kwargs):
        options = kwargs["transformer_options"]
        seen.append((kwargs["img"].shape[0], list(options["cond_or_uncond"]), len(options["uuids"])))

    hook = model.model.diffusion_model.double_blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        ksample(model, "flux", CFG, STEPS)
    finally:
        hook.remove()
    assert seen and all(rows == 2 and sorted(chunks) == [0, 1] and uuids == 2 for rows, chunks, uuids in seen), seen


@pytest.mark.parametrize("family", [f for f in NEW_FAMILIES if f != "mochi"] + ["mochi"])
def test_families_with_per_block_object_patches_equal_unshared_and_the_report_says_what_was_shared(family, caplog):
    """Lumina2, Cosmos Predict2, HiDream and Cosmos 1 run their blocks through object patches (no block-replace):
    the fork's block hooks are not on their path, so the branch runs whole and the report says so; Mochi (a
    block-replace family) shares its prefix. Either way the output equals the unshared run."""
    caplog.set_level(logging.INFO, logger="guidance_kit")
    model = build("PAG", family)
    shared = ksample(model, family, CFG, STEPS)
    lines = report(caplog)
    whole = ksample(shared_off(model), family, CFG, STEPS)
    assert rel_diff(shared, whole) <= SAME
    if family == "mochi":
        assert "prefix shared" in lines and "runs whole" not in lines, lines
    else:
        assert "PAG's branch runs whole (no prefix shared)" in lines, lines


def test_a_spatial_transformer_before_the_fork_runs_as_one_unit():
    """PAG forks at the middle block's first layer: each spatial transformer of the input blocks runs its kept rows
    as one unit (its norm too: one gather for the whole module), the middle one's units decide one by one (its
    fork lies inside it, so its norm runs the whole batch); the output equals the unshared run."""
    model = build("PAG", "sd15")
    units = prefix_fork.fork_layout(model, family_of(model, "test"), block_layout(model, family_of(model, "test")))
    assert units.spans and all(last > first for _, first, last in units.spans)
    norms = {path: comfy.utils.get_attr(model.model, path).norm for path, _, _ in units.spans}
    seen: dict[str, set] = {}
    hooks = [norm.register_forward_pre_hook(lambda m, a, path=path: seen.setdefault(path, set()).add(a[0].shape[0]))
             for path, norm in norms.items()]
    try:
        shared = ksample(model, "sd15", CFG, STEPS)
    finally:
        for hook in hooks:
            hook.remove()
    whole = ksample(shared_off(model), "sd15", CFG, STEPS)
    assert rel_diff(shared, whole) <= SAME
    before = [path for path in norms if ".input_blocks." in path]
    assert before and all(seen[path] == {2} for path in before), seen
    assert seen["diffusion_model.middle_block.1"] == {3}, seen


def test_another_nodes_patch_inside_a_spatial_transformer_falls_back_and_says_why(caplog):
    """Another node's object patch on a transformer layer inside a spatial transformer before the fork: that module
    does not run as one unit, the patched layer runs the whole batch and the report says so."""
    caplog.set_level(logging.INFO, logger="guidance_kit")
    calls = []
    base = tiny_model("sd15")
    units = prefix_fork.fork_layout(base, family_of(base, "test"), block_layout(base, family_of(base, "test")))
    path, first, _ = units.spans[0]
    layer = comfy.utils.get_attr(base.model, units.paths[first + 1])

    def foreign(x, *args, **kwargs):
        calls.append(x.shape[0])
        return type(layer).forward(layer, x, *args, **kwargs)

    base.add_object_patch(f"{units.paths[first + 1]}.forward", foreign)
    model = out(P.PAGNode.execute(base, 3.0, "auto", **WHOLE_RUN))
    shared = ksample(model, "sd15", CFG, STEPS)
    whole = ksample(shared_off(model), "sd15", CFG, STEPS)
    assert rel_diff(shared, whole) <= SAME
    assert set(calls) == {3}
    assert "another node's patch" in report(caplog), report(caplog)
