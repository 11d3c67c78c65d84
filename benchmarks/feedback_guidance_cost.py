"""Per-step cost of Perp-Neg, DNG, FBG, CADS and CFG-Rejection relative to plain CFG, on tiny ComfyUI models (CPU).

    python benchmarks/feedback_guidance_cost.py [--steps 20] [--repeats 5] [--families sd15,flux]

The same measurement as ``step_cost.py`` (median seconds per step of interleaved runs, ratio to plain CFG in the
same run, model-batch chunks per step) for the nodes of ``nodes/feedback_guidance.py``; Perp-Neg and DNG get a
negative prompt of their own (one more chunk per step, in the same batched call).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_cost  # noqa: E402  (registers the package as guidance_kit, finds ComfyUI)

from guidance_kit.nodes import feedback_guidance as fg  # noqa: E402
from tests.comfyui.harness import conditioning  # noqa: E402

TERM = dict(schedule="constant", start_percent=0.0, end_percent=1.0)


def cases(family: str) -> dict:
    negative = conditioning(family, 3)
    return {
        "CFG (plain)": [],
        "Perp-Neg": [(fg.PerpNegNode, dict(perpneg_negative=negative, neg_scale=1.0, **TERM))],
        "DNG": [(fg.DNGNode, dict(dng_negative=negative, scale=5.0, prior=0.01, temperature=0.2, offset=2e-4,
                                  p_max=0.8, **TERM))],
        "FBG": [(fg.FBGNode, dict(mode="hybrid", pi=0.95, t_0=0.5, t_1=0.4, max_guidance=10.0, temperature=0.0,
                                  offset=0.0))],
        "CADS": [(fg.CADSNode, dict(tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0, rescale=True,
                                    apply_to_uncond=True, seed=0))],
        "CFG-Rejection (replace)": [(fg.CFGRejectionNode, dict(mode="replace", reject_at=0.2, reject_fraction=0.5))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default="sd15,flux")
    args = parser.parse_args()
    families = args.families.split(",")
    results = {}
    for family in families:
        step_cost.CASES = cases(family)
        results[family] = step_cost.measure_family(family, args.steps, args.repeats)
    print(f"{args.steps} euler steps, cfg 5, median of {args.repeats} interleaved runs; ms/step, ratio to plain CFG "
          f"in the same run, model-batch chunks per step (plain CFG = 2)")
    print(f"{'method':26s}" + "".join(f"{f:>24s}" for f in families))
    for name in cases(families[0]):
        row = f"{name:26s}"
        for family in families:
            seconds, chunks = results[family][name]
            base = results[family]["CFG (plain)"][0]
            row += f"{seconds * 1e3:11.2f} {seconds / base:6.2f} {chunks:5.2f}"
        print(row)


if __name__ == "__main__":
    main()
