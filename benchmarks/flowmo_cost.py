"""Cost of FlowMo (a gradient through the model at the guided steps) vs plain CFG on the tiny WAN (CPU).

    python benchmarks/flowmo_cost.py [--steps 8] [--repeats 3]

Needs a ComfyUI checkout (COMFYUI_PATH or ~/ComfyUI). Interleaved runs, median seconds per run; the ratio to
plain CFG for the whole run and per guided step (the guided steps are the first half at end_percent 0.5), the
model forwards per run (each FlowMo iteration adds one forward of the cond/uncond pair plus its backward), and
whether the output differs from plain CFG. On a tiny CPU model per-call overhead dominates; on a full-size GPU
model the backward pass costs about twice a forward and the activations of the pair are held for it.
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
from tests.comfyui.harness import counted, ksample, out, rel_diff, tiny_model  # noqa: E402
from guidance_kit.nodes.flowmo import FlowMoNode  # noqa: E402
# isort: on

CFG = 5.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = tiny_model("wan21")
    cases = {"CFG (plain)": base}
    for iterations in (1, 3):
        name = f"FlowMo (iterations {iterations})"
        cases[name] = out(FlowMoNode.execute(base, 0.005, iterations, 0.0, 0.5))
    plain = ksample(base, "wan21", CFG, args.steps)
    times = {name: [] for name in cases}
    forwards = {}
    for _ in range(args.repeats):
        for name, model in cases.items():
            counted_model, counter = counted(model)
            with torch.inference_mode():  # as ComfyUI's executor runs samplers
                start = time.perf_counter()
                result = ksample(counted_model, "wan21", CFG, args.steps)
                times[name].append(time.perf_counter() - start)
            forwards[name] = (counter.calls, rel_diff(result, plain))
    reference = statistics.median(times["CFG (plain)"])
    plain_calls = forwards["CFG (plain)"][0]
    guided = forwards["FlowMo (iterations 1)"][0] - plain_calls  # one extra forward per guided step
    print(f"tiny WAN, {args.steps} steps (FlowMo guides {guided}: progress < 0.5), cfg {CFG}, euler, CPU 1 thread")
    print("| method | s per run | ratio to CFG (run) | ratio per guided step | forwards per run | differs from CFG |")
    print("|---|---|---|---|---|---|")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        per_step = (seconds - reference) / guided / (reference / args.steps) + 1
        calls, difference = forwards[name]
        print(f"| {name} | {seconds:.3f} | {seconds / reference:.2f} | {per_step:.2f} | {calls} | "
              f"{'yes' if difference > 1e-4 else 'no'} |")


if __name__ == "__main__":
    main()
