"""Per-step cost of each Guidance Kit method relative to plain CFG, on tiny ComfyUI models (CPU).

    python benchmarks/step_cost.py [--steps 20] [--repeats 5] [--families sd15,flux,sd3,wan21]

Needs a ComfyUI checkout (COMFYUI_PATH or ~/ComfyUI). Prints a table: seconds per step (median of
repeats, after a warm-up run) and the ratio to plain CFG, plus model calls per step. Timings on tiny
models mostly measure the fixed overhead of each method's tensor work; the ratio on a full-size
model is closer to 1 for every CFG-space method (the model call dominates).
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
from tests.comfyui.harness import FAMILIES, counted, ksample, out, tiny_model  # noqa: E402
from guidance_kit.nodes import cfg_extensions as ce  # noqa: E402
from guidance_kit.nodes import cfg_methods as cm  # noqa: E402
# isort: on

NO_WINDOW = dict(start_percent=0.0, end_percent=1.0, sigma_high=1000.0, sigma_low=0.0)
CASES = {
    "CFG (plain)": [],
    "cfg 1 (cond only)": None,
    "CFG Schedule cosine": [(cm.CFGSchedule, dict(schedule="cosine_increasing", power=2.0, step_values="1",
                                                  **NO_WINDOW))],
    "CFG Schedule interval ½": [(cm.CFGSchedule, dict(schedule="constant", power=2.0, step_values="1",
                                                      start_percent=0.25, end_percent=0.75, sigma_high=1000.0,
                                                      sigma_low=0.0))],
    "β-CFG": [(cm.BetaCFGNode, dict(a=2.0, b=2.0, gamma=1.0, normalize_peak=False))],
    "APG": [(cm.APGNode, dict(eta=0.0, norm_threshold=15.0, momentum=-0.5))],
    "TCFG": [(cm.TCFGNode, {})],
    "CFG-Zero*": [(cm.CFGZeroStarNode, dict(optimized_scale=True, zero_init_steps=1))],
    "FDG (2 levels)": [(cm.FDGNode, dict(scales="8, 3"))],
    "Rescale": [(cm.RescaleNode, dict(multiplier=0.7))],
    "stack: TCFG+APG+FDG+Rescale": [(cm.TCFGNode, {}), (cm.APGNode, dict(eta=0.0, norm_threshold=15.0,
                                                                         momentum=-0.5)),
                                    (cm.FDGNode, dict(scales="8, 3")), (cm.RescaleNode, dict(multiplier=0.7))],
    "Dynamic Thresholding (mimic)": [(ce.DynamicThresholdingNode, dict(
        mode="mimic (sd-dynamic-thresholding)", mimic_scale=2.0, threshold_percentile=0.98, per_channel=True,
        interpolate_phi=1.0, imagen_range=1.0))],
    "Skimmed CFG": [(ce.SkimmedCFGNode, dict(skimming_cfg=2.0, full_skim_negative=False, flipping_filter=True))],
    "Power-law CFG": [(ce.PowerLawCFGNode, dict(alpha=0.9))],
    "ADG": [(ce.ADGNode, dict(max_angle=3.14 / 3))],
    "Momentum Guidance": [(ce.MomentumGuidanceNode, dict(alpha=0.5, beta=0.5))],
    "SMC-CFG": [(ce.SMCCFGNode, dict(smc_lambda=5.0, smc_k=-1.0))],
}


def build(family: str, nodes):
    model = tiny_model(family)
    for node, kwargs in nodes or []:
        model = out(node.execute(model, **kwargs))
    return model


def measure_family(family: str, steps: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds per step and model-batch chunks per step for every case, runs interleaved
    round-robin so that drift in machine load hits every case alike."""
    models = {}
    for name, nodes in CASES.items():
        model, counter = counted(build(family, nodes))
        cfg = 1.0 if nodes is None else 5.0
        ksample(model, family, cfg, steps)  # warm-up
        counter.batches.clear()
        models[name] = (model, counter, cfg)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(repeats):
        for name, (model, _, cfg) in models.items():
            start = time.perf_counter()
            ksample(model, family, cfg, steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: (statistics.median(times[name]), sum(counter.batches) / (repeats * steps))
            for name, (_, counter, _) in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    families = args.families.split(",")
    print(f"torch {torch.__version__}, 1 thread, {args.steps} euler steps, cfg 5, median of {args.repeats} "
          f"interleaved runs; chunks = model-batch entries per step (plain CFG = 2)\n")
    results = {f: measure_family(f, args.steps, args.repeats) for f in families}
    header = f"{'method':30s}" + "".join(f"{f:>23s}" for f in families)
    print(header)
    print(f"{'':30s}" + "".join(f"{'ms/step  ×CFG chunks':>23s}" for _ in families))
    print("-" * len(header))
    for name in CASES:
        row = f"{name:30s}"
        for family in families:
            seconds, chunks = results[family][name]
            base = results[family]["CFG (plain)"][0]
            row += f"{seconds * 1e3:10.2f} {seconds / base:6.2f} {chunks:5.2f}"
        print(row)


if __name__ == "__main__":
    main()
