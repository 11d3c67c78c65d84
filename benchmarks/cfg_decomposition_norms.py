"""Per-step norms of the CFG direction's linear components on the embedded digits model (CFG Decomposition's analysis).

    python benchmarks/cfg_decomposition_norms.py --cfg 4 --out /tmp/cfg_decomposition_norms.png

Samples every digit with the CFG Decomposition node (weights as given; default all 1 = CFG) through ComfyUI's
KSampler path, and at every step decomposes the model's own direction C − U at (x, σ) with the shipped statistics:
mean shift m, positive CPC P·x, negative CPC N·x and the nonlinear rest r = (C − U) − (m + P·x + N·x). Prints the
mean per-sample norm of each per step and draws them against the step (a PNG, PIL only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)

import tests.conftest  # noqa: E402,F401  (registers the package as guidance_kit, finds ComfyUI)
from tests.comfyui import harness  # noqa: E402,F401  (ComfyUI on sys.path)

COLOURS = {"direction": (0, 0, 0), "mean_shift": (214, 39, 40), "positive_cpc": (31, 119, 180),
           "negative_cpc": (44, 160, 44), "residual": (148, 103, 189)}


def measure(cfg: float, steps: int, per_digit: int, weights: tuple[float, float, float], seed: int) -> list[dict]:
    from guidance_kit.digits.linear_statistics import STATISTICS_FILE
    from guidance_kit.digits.model import NUM_DIGITS, UNET_WEIGHTS, load_digits_model
    from guidance_kit.digits.sampling import sample
    from guidance_kit.guiders.methods.cfg_decomposition import LinearStatistics, decompose, per_sample_norms
    from guidance_kit.nodes.seed_papers import CFGDecompositionNode

    loaded = load_digits_model(UNET_WEIGHTS)
    stats = LinearStatistics.load(STATISTICS_FILE)
    classes = [d for d in range(NUM_DIGITS) for _ in range(per_digit)]
    labels = torch.tensor(classes)
    records: list[dict] = []

    def record(args):
        x, sigma = args["input"], float(args["sigma"].reshape(-1)[0])
        direction = (args["cond_denoised"] - args["uncond_denoised"]).double()
        mean_shift, positive, negative = decompose(x, sigma, labels, stats)
        parts = {"direction": direction, "mean_shift": mean_shift, "positive_cpc": positive,
                 "negative_cpc": negative, "residual": direction - mean_shift - positive - negative}
        records.append({"sigma": sigma, **{k: float(per_sample_norms(v).mean()) for k, v in parts.items()}})
        return args["denoised"]

    model = CFGDecompositionNode.execute(loaded.patcher, *weights).result[0].clone()
    model.set_model_sampler_post_cfg_function(record)
    sample(model, loaded, classes, seed, cfg, steps=steps)
    return records


def draw(records: list[dict], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    width, height, margin = 720, 420, 50
    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    top = max(max(r[k] for k in COLOURS) for r in records) * 1.05
    n = len(records)

    def point(i, value):
        return (margin + (width - 2 * margin) * i / max(1, n - 1),
                height - margin - (height - 2 * margin) * value / top)

    pen.rectangle([margin, margin, width - margin, height - margin], outline=(160, 160, 160))
    pen.text((margin, 15), title, fill=(0, 0, 0))
    pen.text((margin, height - margin + 8), "step 1", fill=(0, 0, 0))
    pen.text((width - margin - 40, height - margin + 8), f"step {n}", fill=(0, 0, 0))
    pen.text((5, margin - 12), f"{top:.2f}", fill=(0, 0, 0))
    for j, (name, colour) in enumerate(COLOURS.items()):
        pen.line([point(i, r[name]) for i, r in enumerate(records)], fill=colour, width=2)
        pen.text((width - margin - 130, margin + 8 + 14 * j), name.replace("_", " "), fill=colour)
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-digit", type=int, default=4)
    parser.add_argument("--weights", type=float, nargs=3, default=(1.0, 1.0, 1.0),
                        metavar=("MEAN_SHIFT", "POSITIVE_CPC", "NEGATIVE_CPC"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="cfg_decomposition_norms.png")
    args = parser.parse_args(argv)
    records = measure(args.cfg, args.steps, args.per_digit, tuple(args.weights), args.seed)
    names = list(COLOURS)
    print("step  sigma    " + "  ".join(f"{n:>12}" for n in names))
    for i, r in enumerate(records):
        print(f"{i + 1:>4}  {r['sigma']:7.3f}  " + "  ".join(f"{r[n]:12.3f}" for n in names))
    draw(records, Path(args.out), f"CFG direction components per step, digits model, cfg {args.cfg:g}, "
                                  f"weights {tuple(args.weights)}")
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
