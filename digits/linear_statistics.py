"""Estimate the digits model's linear (Gaussian) statistics for CFG Decomposition from its own samples.

    python -m digits.linear_statistics          # in the pack folder: the shipped file (~1 min, 1 CPU thread)
    python -m digits.linear_statistics --per-class 50 --out /tmp/stats.safetensors   # a quick run

The statistics are those of the model, not of the training digits: ``--per-class`` samples of each digit
drawn from the model at cfg 1 (its own conditional distribution, no guidance) and as many unconditional
samples (the null class at cfg 1), Euler, 30 steps, fixed seeds; per class the mean and covariance (plus
``--shrinkage``·I, so every W = Σ(Σ + σ²I)⁻¹ is well defined), the same for the unconditional samples, and
the model's class-embedding table (which identifies the class of a conditioning row at sampling time). One
CPU thread and fixed seeds: the same command gives the same file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .comfy_setup import ComfyUINotFound, import_comfyui, import_pack

STATISTICS_FILE = Path(__file__).resolve().parent / "weights" / "digits_linear_statistics.safetensors"


def estimate(per_class: int, steps: int, shrinkage: float, seed: int, out: Path) -> Path:
    import_pack()
    from guidance_kit.digits.model import NULL_CLASS, NUM_DIGITS, UNET_WEIGHTS, load_digits_model
    from guidance_kit.digits.sampling import sample
    from guidance_kit.guiders.methods.cfg_decomposition import LinearStatistics

    digits_model = load_digits_model(UNET_WEIGHTS)
    samples, labels = [], []
    for digit in range(NUM_DIGITS):
        samples.append(sample(digits_model.patcher, digits_model, [digit] * per_class, seed + digit, cfg=1.0,
                              steps=steps))
        labels.append(torch.full((per_class,), digit, dtype=torch.long))
    uncond = sample(digits_model.patcher, digits_model, [NULL_CLASS] * per_class, seed + NUM_DIGITS, cfg=1.0,
                    steps=steps)
    stats = LinearStatistics.from_samples(torch.cat(samples), torch.cat(labels), uncond, shrinkage,
                                          class_embedding=digits_model.class_embedding)
    return stats.save(out, {"model": UNET_WEIGHTS.name, "per_class": per_class, "steps": steps, "sampler": "euler",
                            "cfg": 1.0, "shrinkage": shrinkage, "seed": seed,
                            "script": "python -m digits.linear_statistics"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m digits.linear_statistics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=200, help="samples per digit and unconditional (200)")
    parser.add_argument("--steps", type=int, default=30, help="Euler steps per sample (30)")
    parser.add_argument("--shrinkage", type=float, default=1e-3, help="added to every covariance's diagonal")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=None, help=f"output (default {STATISTICS_FILE})")
    parser.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: COMFYUI_PATH, ~/ComfyUI)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.per_class < 2:
        print("python -m digits.linear_statistics: --per-class must be at least 2", file=sys.stderr)
        return 2
    try:
        import_comfyui(args.comfyui, cpu=True)
    except ComfyUINotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    path = estimate(args.per_class, args.steps, args.shrinkage, args.seed, Path(args.out or STATISTICS_FILE))
    print(f"saved {path} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
