"""``compare.py metrics`` for the methods with a negative prompt of their own (Perp-Neg, DNG) on the digits model,
with a digit as that negative.

    python benchmarks/negative_prompts_digits.py [--scales 3 5 8] [--seeds 0] [--samples 10]

``compare.py metrics`` hands a CONDITIONING input the run's negative, which on the digits model is the null class
(the sampler's own uncond): Perp-Neg's and DNG's negative then equals U and both reduce to CFG. Here the sampler's
negative stays the null class and the node's negative is, per sample, the digit most often confused with the
requested one (0↔6, 1↔7, 2↔7, 3↔8, 4↔9, 5↔6); the report (method table and equal-strength table) is the
metrics report's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import COMFYUI_PATH, comfy_setup  # noqa: E402  (registers the package as guidance_kit)

comfy_setup.import_comfyui(COMFYUI_PATH, cpu=True)
from guidance_kit.comparison.methods import apply_row, row_sampler  # noqa: E402
from guidance_kit.comparison.report import metrics_report  # noqa: E402
from guidance_kit.comparison.runs import EmbeddedRunner  # noqa: E402

CONFUSED_WITH = {0: 6, 1: 7, 2: 7, 3: 8, 4: 9, 5: 6, 6: 0, 7: 1, 8: 3, 9: 4}


class NegativeDigitRunner(EmbeddedRunner):
    """The digits runner with each sample's confusable digit as the nodes' own negative prompt."""

    def samples(self, row, scale, seed):
        from guidance_kit.digits import sampling

        negative = self.model.conditioning([CONFUSED_WITH[int(d)] for d in self.labels.tolist()])
        patched = apply_row(self.model.patcher.clone(), row, scale, negative=negative, seed=seed)
        return sampling.sample(patched, self.model, self.labels.tolist(), seed, row.cfg_at(scale), self.steps,
                               self.sampler, self.scheduler, sampler=row_sampler(row, scale))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["cfg", "perp_neg", "dng", "dng:prior=0.2"])
    parser.add_argument("--scales", nargs="+", type=float, default=[3.0, 5.0, 8.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    runner = NegativeDigitRunner(samples_per_class=args.samples)
    report = metrics_report(runner, args.methods, args.scales, args.seeds, mixture=False, progress=False)
    print(report.text)


if __name__ == "__main__":
    main()
