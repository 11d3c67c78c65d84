#!/usr/bin/env python3
"""Guidance Kit compare: the same seeds under several guidance methods and scales, as one picture with numbers.

Run it with Python from the pack folder (ComfyUI is found through --comfyui, COMFYUI_PATH, the ComfyUI
this pack sits in, or ~/ComfyUI):

    python compare.py                                     # embedded digits model, no download, CPU is fine
    python compare.py --rows cfg apg tcfg+apg "pag:scale=2" --scales 1 3 5 8 --out grid.png
    python compare.py --rows cfg apg --scales 5 --seeds 0 1 2 3          # columns = seeds
    python compare.py --checkpoint sd_v1-5.safetensors --prompt "a red fox in snow" --rows cfg apg fdg
    python compare.py --server http://127.0.0.1:8188 --workflow workflows/api/apg_sdxl.api.json \\
        --row-set "label=CFG 10.eta=1 10.momentum=0" --row-set "label=APG" --scales 4 8 12
    python compare.py --servers http://gpu1:8188,http://gpu2:8188         # the digits grid, drawn by 2 servers
    python compare.py metrics                             # every method × scales × 3 seeds, mean ± spread
    python compare.py methods                             # the row syntax and every method's inputs

Rows are method stacks applied through the pack's own nodes: ``apg``, ``apg:eta=1,momentum=0``,
``tcfg+apg+pag:scale=2``; ``{scale}`` in a value is the column's cfg (``fdg:scales={scale}, {scale/2}``);
``cfg=`` sets a row's own sampler cfg (``pag:scale={scale},cfg=1``); the sampler methods (``cfgpp_2m``,
``cfgpp_3m``, ``pcg``) replace the row's sampler, with the column's cfg mapped to their λ / γ.
Columns are the sampler's cfg (``--scales``) or seeds (``--seeds``). Server mode rows and columns are
lists of workflow overrides (``NODE.INPUT=VALUE``, as workflows/queue_workflow.py). Several ``--server``
share the cells through one work queue (comparison/fanout.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
import warnings
from pathlib import Path

PACKAGE = "guidance_kit"
COMMANDS = ("compare", "metrics", "methods")
DEFAULT_ROWS = ("cfg", "cfg_schedule", "apg", "cfg_zero_star", "fdg", "pag", "seg", "tsg")
DEFAULT_SCALES = (1.0, 3.0, 5.0, 8.0)
EXIT_USAGE, EXIT_UNREACHABLE = 2, 3
EXIT_CELLS_FAILED, EXIT_CANCELLED = 1, 130  # several servers: some cells failed everywhere / Ctrl-C (grid written)
ROW_SYNTAX = """Row syntax: a method, or a stack joined with '+', each with optional INPUT=VALUE settings:
    apg    apg:eta=1,momentum=0    tcfg+apg+pag:scale=2    fdg:scales={scale}, {scale/2}
{scale} is the column's cfg (arithmetic, min() and max() allowed). Inputs not set keep the node's default
(listed below). cfg=VALUE on any method sets the row's own sampler cfg: pag:scale={scale},cfg=1 is PAG alone.
Sampler methods (cfgpp_2m, cfgpp_3m, pcg) replace the row's sampler; the column's cfg is mapped to their own
scale (CFG++: lambda = cfg/12.5; PCG: gamma = 2*cfg - 1), and 'compare.py metrics' matches them to CFG by strength.
"""


def _comfy_setup():
    """``digits/comfy_setup.py``, the pack's one module for finding ComfyUI and importing this folder as the
    package ``guidance_kit``, loaded by path (it imports nothing of the pack) under its name in the package."""
    name = f"{PACKAGE}.digits.comfy_setup"
    if name not in sys.modules:
        # this file's own path, unresolved: a pack reached through a symlink in ComfyUI/custom_nodes finds that ComfyUI
        spec = importlib.util.spec_from_file_location(name, Path(os.path.abspath(__file__)).parent / "digits" /
                                                      "comfy_setup.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def import_pack():
    """This folder as the package ``guidance_kit`` (its name may have hyphens), without shadowing ComfyUI."""
    # the script's own folder on sys.path would make our nodes/ hide ComfyUI's nodes.py
    return _comfy_setup().import_pack(hide_folder=True)


def parse_digits(text: str) -> tuple[int, ...]:
    digits = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--digits {text!r}: write digits and ranges, e.g. '0-9' or '1,4,7'") \
                from None
        if not (0 <= low <= high <= 9):
            raise argparse.ArgumentTypeError(f"--digits {text!r}: digits are 0–9")
        digits.extend(range(low, high + 1))
    if not digits:
        raise argparse.ArgumentTypeError("--digits: at least one digit")
    return tuple(dict.fromkeys(digits))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help=f"sampler cfg values (default: {' '.join(f'{s:g}' for s in DEFAULT_SCALES)}; server mode: "
                             f"the workflow's own)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--sampler", default="euler", help="ComfyUI sampler name (default euler)")
    parser.add_argument("--scheduler", default="normal", help="ComfyUI scheduler name (default normal)")
    parser.add_argument("--samples", type=int, default=10,
                        help="embedded model: samples per digit behind the numbers (default 10)")
    parser.add_argument("--digits", type=parse_digits, default=tuple(range(10)),
                        help="embedded model: digits to draw, e.g. '0-9' or '1,4,7' (default 0-9)")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default: COMFYUI_PATH, the ComfyUI this "
                                                        "pack is in, or ~/ComfyUI)")
    parser.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU (as ComfyUI's --cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true",
                        help="show the pack's warnings (e.g. 'cfg 1: APG has no effect') and ComfyUI's log")


def _server_options(group) -> None:
    group.add_argument("--server", action="append", default=[], metavar="URL",
                       help="ComfyUI address, e.g. http://127.0.0.1:8188; repeat it for several servers (each cell "
                            "goes to a server whose queue is empty)")
    group.add_argument("--servers", action="append", default=[], metavar="URL,URL",
                       help="several servers at once, comma-separated (adds to --server)")
    group.add_argument("--timeout", type=float, default=600.0,
                       help="seconds one cell may take on a server before that server is given up (default 600)")


def _server_urls(args) -> list[str]:
    """--server and --servers, in order, each once."""
    urls = list(getattr(args, "server", None) or [])
    for text in getattr(args, "servers", None) or []:
        urls += [part.strip() for part in text.split(",") if part.strip()]
    return list(dict.fromkeys(urls))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python compare.py", description=__doc__.split("\n\n")[0],
                                     epilog="Run 'python compare.py COMMAND --help' for a command's options. "
                                            "Without a command: compare.")
    commands = parser.add_subparsers(dest="command")
    grid = commands.add_parser("compare", help="render a grid PNG and print its metrics (default)",
                               description="Render a grid: rows = methods or stacks, columns = scales or seeds.")
    grid.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                      help="method stacks, one per row (default: %(default)s); see 'python compare.py methods'")
    grid.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="noise seeds (default 0; server mode: the workflow's own)")
    grid.add_argument("--columns", choices=("scales", "seeds"), default=None,
                      help="what the columns sweep (default: scales when several are given, else seeds)")
    grid.add_argument("--out", default="compare_grid.png", help="output PNG (default %(default)s)")
    grid.add_argument("--title", default=None, help="title drawn above the grid")
    grid.add_argument("--upscale", type=int, default=4, help="embedded model: pixel enlargement in the picture")
    _common(grid)
    user = grid.add_argument_group("(b) your checkpoint in a local ComfyUI")
    user.add_argument("--checkpoint", help="checkpoint file name in ComfyUI's models/checkpoints, or a path")
    user.add_argument("--prompt", help="positive prompt (with --checkpoint)")
    user.add_argument("--negative", default="", help="negative prompt (with --checkpoint)")
    user.add_argument("--width", type=int, default=512)
    user.add_argument("--height", type=int, default=512)
    user.add_argument("--batch", type=int, default=1, help="images per cell (with --checkpoint)")
    server = grid.add_argument_group("(c) running ComfyUI servers",
                                     "--workflow: your workflow with --set/--row-set/--column-set overrides; without "
                                     "it the --rows on the embedded digits model, drawn by the servers")
    _server_options(server)
    server.add_argument("--workflow", help="API-format workflow (Workflow → Export (API))")
    server.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override for every cell; repeatable")
    server.add_argument("--row-set", action="append", default=[], metavar="'[label=NAME] NODE.INPUT=VALUE ...'",
                        help="one row's overrides; repeatable (one row per use)")
    server.add_argument("--column-set", action="append", default=[], metavar="'[label=NAME] NODE.INPUT=VALUE ...'",
                        help="one column's overrides; repeatable (replaces the scale/seed columns)")

    report = commands.add_parser("metrics", help="metrics of every method at several scales and seeds (embedded "
                                                 "model), with equal-strength and exact-mixture tables")
    report.add_argument("--methods", nargs="+", default=None, help="method stacks (default: every method)")
    report.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    report.add_argument("--no-mixture", action="store_true", help="skip the exact Gaussian-mixture benchmark")
    report.add_argument("--no-equal-strength", action="store_true", help="skip the equal-strength table")
    report.add_argument("--out", default=None, help="also write the report to this text file")
    _common(report)
    _server_options(report.add_argument_group("running ComfyUI servers (the runs drawn there, measured here)"))
    report.set_defaults(scales=[1.0, 3.0, 5.0, 7.5], samples=10)

    commands.add_parser("methods", help="list the methods, their inputs and the row syntax")
    return parser


class UsageError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------

def _setup_comfyui(args) -> Path:
    from guidance_kit.digits.comfy_setup import import_comfyui

    path = import_comfyui(args.comfyui, cpu=args.cpu)
    import comfy.samplers
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    if args.sampler not in comfy.samplers.KSampler.SAMPLERS:
        raise UsageError(f"--sampler {args.sampler!r} is not a ComfyUI sampler; choose one of "
                         f"{', '.join(comfy.samplers.KSampler.SAMPLERS)}")
    if args.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise UsageError(f"--scheduler {args.scheduler!r} is not a ComfyUI scheduler; choose one of "
                         f"{', '.join(comfy.samplers.KSampler.SCHEDULERS)}")
    return path


def _columns(args, mode: str) -> list[tuple[str, float | None, int | None, list[str]]]:
    """(label, cfg, seed, overrides) per column; None keeps the workflow's own value (server mode)."""
    scales, seeds = args.scales, args.seeds
    if mode != "server":
        scales, seeds = scales or list(DEFAULT_SCALES), seeds or [0]
        if args.column_set or args.row_set or args.sets:
            raise UsageError("--set, --row-set and --column-set are for the server mode (--server with --workflow); "
                             "elsewhere, rows are --rows method stacks")
    if args.column_set:
        from guidance_kit.comparison.server import OverrideSet

        if len(scales or []) > 1 or len(seeds or []) > 1:
            raise UsageError("with --column-set the columns are your override lists: give at most one --scales "
                             "and one --seeds value")
        return [(s.label, scales[0] if scales else None, seeds[0] if seeds else None, list(s.assignments))
                for s in map(OverrideSet.parse, args.column_set)]
    axis = args.columns or ("seeds" if len(seeds or []) > 1 and len(scales or []) <= 1 else "scales")
    if axis == "scales":
        if len(seeds or []) > 1:
            raise UsageError("the columns sweep the scales, so give one --seeds value (or --columns seeds)")
        seed = seeds[0] if seeds else None
        if not scales:
            return [("as saved", None, seed, [])]
        return [(f"cfg {s:g}", s, seed, []) for s in scales]
    if not seeds:
        raise UsageError("--columns seeds needs --seeds")
    if len(scales or []) > 1:
        raise UsageError("the columns sweep the seeds, so give one --scales value")
    return [(f"seed {seed}", scales[0] if scales else None, seed, []) for seed in seeds]


def command_compare(args) -> int:
    from guidance_kit.comparison.grid import render_grid
    from guidance_kit.comparison.report import format_table, progress_bar

    servers = _server_urls(args)
    if servers or args.workflow:
        if args.workflow and not servers:
            raise UsageError("the server mode needs both --server URL and --workflow FILE (API format)")
        if args.checkpoint:
            raise UsageError("choose one: --checkpoint (in this process) or --server (running ComfyUI servers)")
        mode = "server" if args.workflow else "remote"  # remote: the --rows on the digits model, drawn by servers
    elif args.checkpoint or args.prompt:
        mode = "checkpoint"
        if not (args.checkpoint and args.prompt):
            raise UsageError("the checkpoint mode needs --checkpoint NAME and --prompt TEXT")
    else:
        mode = "embedded"
    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    columns = _columns(args, mode)

    if mode == "server":
        from guidance_kit.comparison.server import OverrideSet, WorkflowCells

        row_sets = [OverrideSet.parse(text) for text in args.row_set] or [OverrideSet("as saved", ())]
        source = WorkflowCells(args.workflow, args.sets)
        row_labels = [r.label for r in row_sets]

        def job(i, column):
            label, scale, seed, overrides = column
            return source.job(f"{row_labels[i]} × {label}", list(row_sets[i].assignments) + overrides, scale, seed)
        finish = source.cell
        # the picture names no server: the same grid drawn on other servers is the same picture
        description = f"{Path(args.workflow).name} on ComfyUI"
    else:
        from guidance_kit.comparison.methods import parse_row

        rows = [parse_row(text) for text in args.rows]
        comfyui = _setup_comfyui(args)
        if mode == "remote":
            from guidance_kit.comparison.fanout import FanOut
            from guidance_kit.comparison.remote_digits import RemoteDigitsRunner

            fanout = FanOut(servers, args.timeout, progress=not args.no_progress)
            runner = RemoteDigitsRunner(fanout, args.steps, args.sampler, args.scheduler, args.samples, args.digits,
                                        args.upscale)

            def job(i, column):
                return runner.job(rows[i], column[1], column[2], f"{rows[i].label} × {column[0]}")
            finish = runner.cell_run
            description = (f"embedded digits model on ComfyUI (one sampler node per digit) · {args.steps} steps "
                           f"{args.sampler}/{args.scheduler} · numbers from {args.samples} samples per digit")
        elif mode == "embedded":
            from guidance_kit.comparison.runs import EmbeddedRunner

            runner = EmbeddedRunner(args.steps, args.sampler, args.scheduler, args.samples, args.digits, args.upscale)
            description = (f"embedded digits model · {args.steps} steps {args.sampler}/{args.scheduler} · numbers from "
                           f"{args.samples} samples per digit")
        else:
            from guidance_kit.comparison.runs import CheckpointRunner

            runner = CheckpointRunner(args.checkpoint, args.prompt, args.negative, args.width, args.height, args.steps,
                                      args.sampler, args.scheduler, args.batch, comfyui)
            description = f"{Path(args.checkpoint).name} · {args.prompt!r} · {args.steps} steps {args.sampler}"
        row_labels = [r.label for r in rows]

        def run(i, column):
            return runner.run(rows[i], column[1], column[2])

    start = time.perf_counter()
    outcome, bar = None, None
    if mode in ("server", "remote"):  # every cell a prompt, over the servers' work queue (comparison/fanout.py)
        from guidance_kit.comparison.fanout import FanOut, failure_text, missing_cell
        from guidance_kit.workflows.queue_workflow import QueueError

        if mode == "server":
            fanout = FanOut(servers, args.timeout, progress=not args.no_progress)
        outcome = fanout.run([job(i, column) for i in range(len(row_labels)) for column in columns])
        drawn = {k: finish(value, seconds) for k, (value, seconds, _) in outcome.results.items()}
        failures = [failure_text(f"{row_labels[k // len(columns)]} × {columns[k % len(columns)][0]}", errors)
                    for k, errors in sorted(outcome.failures.items())]
        if not drawn:
            if outcome.cancelled:
                print("compare: cancelled before any cell was done: no grid written", file=sys.stderr)
                return EXIT_CANCELLED
            raise QueueError(f"compare: every cell failed; the first: {failures[0]}")
        for text in failures:
            print(f"error: {text}", file=sys.stderr)
        size = next(iter(drawn.values())).cell.image.size
    else:
        bar = progress_bar(len(row_labels) * len(columns), "compare", not args.no_progress)
    cells, table = [], []
    for i, row_label in enumerate(row_labels):
        line = []
        for j, column in enumerate(columns):
            if outcome is None:
                result = run(i, column)
            else:
                result = drawn.get(i * len(columns) + j)
                if result is None:  # the grid keeps its layout: a stand-in for a failed or cancelled cell
                    status = "failed" if i * len(columns) + j in outcome.failures else "not run"
                    line.append(missing_cell(size, status))
                    table.append([row_label, column[0]] + ["—"] * len(_metric_keys(mode)) + [status])
                    continue
            line.append(result.cell)
            table.append([row_label, column[0]] + [_number(result.metrics.get(key)) for key, _ in _metric_keys(mode)]
                         + [f"{result.seconds:.2f}"])
            if bar is not None:
                bar.update(1)
        cells.append(line)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    footer = f"Guidance Kit compare · {description} · " + "; ".join(
        f"{short} = {meaning}" for short, meaning in _legend(mode))
    picture = render_grid(cells, row_labels, [c[0] for c in columns], title=args.title or "", footer=footer)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(format_table(["row", "column"] + [title for _, title in _metric_keys(mode)] + ["seconds"], table))
    print(f"\nsaved {out} ({len(row_labels)}×{len(columns)} cells in {seconds:.1f} s)")
    if outcome is not None:
        print(f"\nServers:\n{fanout.report()}")
        if outcome.cancelled:
            return EXIT_CANCELLED
        return EXIT_CELLS_FAILED if outcome.failures else 0
    return 0


def _metric_keys(mode: str) -> list[tuple[str, str]]:
    if mode in ("embedded", "remote"):
        return [("adherence", "adherence"), ("margin", "margin"), ("frechet", "Fréchet"),
                ("diversity", "diversity"), ("clipped_percent", "clipped %"), ("mean_abs", "mean |x|")]
    return [("saturated_percent", "saturated %"), ("brightness", "brightness"), ("contrast", "contrast")]


def _legend(mode: str) -> list[tuple[str, str]]:
    if mode in ("embedded", "remote"):
        return [("acc", "classifier adherence to the digit"), ("FD", "Fréchet distance to held-out digits"),
                ("div", "mean distance within a digit"), ("clip%", "pixels beyond [-1, 1] by > half a grey level")]
    return [("sat%", "channels at 0 or 255"), ("std", "contrast"), ("mean", "brightness")]


def _number(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def command_metrics(args) -> int:
    from guidance_kit.comparison.methods import ALL_METHODS
    from guidance_kit.comparison.report import metrics_report
    from guidance_kit.comparison.runs import EmbeddedRunner

    _setup_comfyui(args)
    if args.samples < 2:
        raise UsageError("metrics needs --samples 2 or more (diversity and Fréchet distance compare samples)")
    servers = _server_urls(args)
    if servers:
        from guidance_kit.comparison.fanout import FanOut
        from guidance_kit.comparison.remote_digits import RemoteDigitsRunner

        fanout = FanOut(servers, args.timeout, progress=not args.no_progress, description="metrics")
        runner = RemoteDigitsRunner(fanout, args.steps, args.sampler, args.scheduler, args.samples, args.digits)
    else:
        runner = EmbeddedRunner(args.steps, args.sampler, args.scheduler, args.samples, args.digits)
    report = metrics_report(runner, args.methods or ALL_METHODS, args.scales, args.seeds,
                            mixture=not args.no_mixture, equal_strength=not args.no_equal_strength,
                            progress=not args.no_progress)
    text = report.text + (f"\n\nServers:\n{fanout.report()}" if servers else "")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    if servers and runner.cancelled:
        return EXIT_CANCELLED
    return 1 if servers and runner.failed else 0


def command_methods(args) -> int:
    from guidance_kit.comparison.methods import ALIASES, METHODS, is_conditioning, node_class

    print(ROW_SYNTAX)
    try:
        from guidance_kit.digits.comfy_setup import import_comfyui

        import_comfyui(None, cpu=True)
        with_inputs = True
    except Exception as e:  # listing works without ComfyUI, minus the inputs
        print(f"(inputs not listed: {e})\n")
        with_inputs = False
    for key, method in METHODS.items():
        aliases = [a if target == key else f"{a} = {target}" for a, target in ALIASES.items()
                   if target.partition(":")[0] == key]
        line = f"{key:<15} {method.label}" + (f" (also: {', '.join(aliases)})" if aliases else "")
        if with_inputs and method.node:
            try:
                inputs = [i for i in node_class(method).define_schema().inputs if i.id != "model"]
                shown = [f"{i.id}=<the run's negative>" if is_conditioning(i)
                         else f"{i.id}={getattr(i, 'default', None)!r}" for i in inputs]
                line += "\n" + " " * 16 + (", ".join(shown) or "(no inputs)")
                if method.overrides:
                    line += "\n" + " " * 16 + "compare uses: " + ", ".join(f"{k}={v!r}"
                                                                           for k, v in method.overrides.items())
            except Exception as e:
                line += f"\n{' ' * 16}(not available: {e})"
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "compare")
    args = build_parser().parse_args(argv)
    import_pack()
    if not getattr(args, "verbose", False):
        # a grid sweeps settings on purpose (cfg 1 included): the per-run warnings would drown the table
        logging.getLogger("guidance_kit").setLevel(logging.ERROR)
        # torchsde (SDE samplers) warns about float rounding of the first sigma on every run
        warnings.filterwarnings("ignore", message="Should have tb<=t1")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(max(1, args.threads))
    from guidance_kit.comparison.methods import MethodSpecError
    from guidance_kit.comparison.runs import CompareError
    from guidance_kit.digits.comfy_setup import ComfyUINotFound
    from guidance_kit.workflows.queue_workflow import QueueError

    handlers = {"compare": command_compare, "metrics": command_metrics, "methods": command_methods}
    try:
        return handlers[args.command](args)
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code if e.exit_code == EXIT_UNREACHABLE else EXIT_USAGE
    except (UsageError, CompareError, MethodSpecError, ComfyUINotFound) as e:
        print(f"error: {e}" if str(e).startswith(("compare", "Guidance Kit")) else f"error: compare: {e}",
              file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        # the pack's own run-time refusals (their messages name the method and the fix), and missing weights/data
        if type(e).__name__ in ("DigitsWeightsError", "DigitClassifierError", "DigitsDataError",
                                "GuidanceRuntimeError", "PerturbationNotApplied", "NagNotApplied",
                                "GuidanceSamplerError", "SecondModelError", "DeltaNotApplied"):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    except ValueError as e:  # a node refused its inputs (the message names the node)
        print(f"error: compare: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # outside a grid's queue (which cancels its cells and writes what is done)
        print("compare: interrupted", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
