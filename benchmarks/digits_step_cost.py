"""Per-step cost of compare.py rows on the embedded digits model, relative to plain CFG in the same run (CPU).

    python benchmarks/digits_step_cost.py [--rows cfg adg smc_cfg ...] [--scale 5] [--steps 20] [--repeats 5]

Each row draws the digits batch of ``compare.py metrics`` (10 digits × --samples) through the nodes' own
execute, as the metrics report does; runs are interleaved round-robin so drift in machine load hits every row
alike. Prints the median seconds per step and the ratio to CFG.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

# isort: off
import tests.conftest  # noqa: E402,F401  (registers the package as guidance_kit, finds ComfyUI)
from tests.comfyui import harness  # noqa: E402,F401  (ComfyUI on sys.path)
from guidance_kit.comparison.methods import parse_row  # noqa: E402
from guidance_kit.comparison.runs import EmbeddedRunner  # noqa: E402
# isort: on

DEFAULT_ROWS = ("cfg", "dynamic_thresholding", "skimmed_cfg", "power_law_cfg", "adg", "momentum_guidance", "smc_cfg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS))
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [parse_row(text) for text in dict.fromkeys(["cfg", *args.rows])]
    runner = EmbeddedRunner(args.steps, samples_per_class=args.samples)
    for row in rows:
        runner.samples(row, args.scale, 0)  # warm-up
    times: dict[str, list[float]] = {row.label: [] for row in rows}
    for repeat in range(args.repeats):
        for row in rows:
            start = time.perf_counter()
            runner.samples(row, args.scale, repeat)
            times[row.label].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["CFG"])
    print(f"digits model, {10 * args.samples} samples per batch, {args.steps} euler steps, cfg {args.scale:g}, "
          f"1 thread, median of {args.repeats} interleaved runs\n")
    print(f"{'row':28s} {'ms/step':>8s} {'×CFG':>6s}")
    for label, values in times.items():
        seconds = statistics.median(values)
        print(f"{label:28s} {seconds * 1e3:8.2f} {seconds / base:6.2f}")


if __name__ == "__main__":
    main()
