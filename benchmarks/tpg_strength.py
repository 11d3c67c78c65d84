"""TPG's strength against the token count and the layer choice (CPU, one thread).

    python benchmarks/tpg_strength.py [--sizes 8 16 32] [--steps 20] [--scale 3] [--cfg 3]

For the embedded digits model (trained at 8×8; 16×16 and 32×32 run the same UNet on larger latents, off
its training distribution) and a tiny random-weight Flux, one KSampler run per (layers, latent size) with
CFG + TPG; every model call's predictions are read by an APPLY_MODEL wrapper and reported as

* ``|C−C̃|/|C|``: the TPG branch's change of the conditional prediction (x0), per sample, mean over steps;
* ``|C−C̃|/|C−U|``: the TPG term relative to the CFG direction (how strong TPG at scale s is next to CFG);
* ``clip%``: samples beyond the ink level (digits only; ``digits.metrics.saturation``) and, for reference,
  plain CFG's at the same size.

The question behind it (issue §3): TPG at its default clipped ~58% of the digits' pixels. Token count is
not what drives it; the layer choice is (the results are in the TPG help page).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

# isort: off
import tests.conftest  # noqa: E402,F401  (registers the package as guidance_kit, finds ComfyUI)
from tests.comfyui import harness  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
from guidance_kit.digits.metrics import saturation  # noqa: E402
from guidance_kit.digits.model import cached_digits_model  # noqa: E402
from guidance_kit.nodes import perturbation as P  # noqa: E402
# isort: on


class Recorder:
    """APPLY_MODEL wrapper: per call with cond (0), uncond (1) and one branch chunk, the two ratios."""

    def __init__(self):
        self.change, self.relative = [], []

    def __call__(self, executor, x, t, *args, **kwargs):
        to = args[3] if len(args) > 3 else kwargs.get("transformer_options")
        result = executor(x, t, *args, **kwargs)
        chunks = to["cond_or_uncond"]
        per = x.shape[0] // len(chunks)
        parts = {c: result[i * per:(i + 1) * per].float() for i, c in enumerate(chunks)}
        others = [c for c in parts if c not in (0, 1)]
        if 0 in parts and 1 in parts and others:
            c, u, b = parts[0], parts[1], parts[others[0]]
            delta = (c - b).flatten(1).norm(dim=1)
            self.change.append((delta / c.flatten(1).norm(dim=1).clamp_min(1e-8)).mean().item())
            self.relative.append((delta / (c - u).flatten(1).norm(dim=1).clamp_min(1e-8)).mean().item())
        return result


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def digits_run(layers: str | None, size: int, args) -> tuple[float, float, float]:
    digits = cached_digits_model()
    model = digits.patcher.clone()
    if layers is not None:
        model = P.TPGNode.execute(model, args.scale, layers, 0, "constant", 0.0, 1.0).result[0]
    recorder = Recorder()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tpg_strength", recorder)
    samples = args.samples if size <= 8 else args.large_samples  # attention over size² tokens: keep it small
    classes = [d for _ in range(samples) for d in range(10)]
    latent = torch.zeros(len(classes), 1, size, size)
    samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), args.steps, args.cfg, "euler", "normal",
                                  digits.conditioning(classes), digits.null_conditioning(len(classes)), latent,
                                  disable_pbar=True, seed=0)
    return _mean(recorder.change), _mean(recorder.relative), 100.0 * saturation(samples.float())[0]


def flux_run(size: int, args) -> tuple[float, float]:
    model = P.TPGNode.execute(harness.tiny_model("flux"), args.scale, "auto", 0, "constant", 0.0, 1.0).result[0]
    recorder = Recorder()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tpg_strength", recorder)
    latent = torch.zeros(1, 16, size, size)
    comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), args.steps, args.cfg, "euler", "normal",
                        harness.conditioning("flux", 1), harness.conditioning("flux", 2), latent, disable_pbar=True,
                        seed=0)
    return _mean(recorder.change), _mean(recorder.relative)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=10, help="digits at 8×8: samples per class")
    parser.add_argument("--large-samples", type=int, default=2, help="digits above 8×8: samples per class")
    args = parser.parse_args()
    print(f"TPG scale {args.scale}, cfg {args.cfg}, {args.steps} euler steps")
    print(f"{'model / layers':42} {'latent':>6} {'tokens':>7} {'|C-C~|/|C|':>11} {'|C-C~|/|C-U|':>13} {'clip%':>6} "
          f"{'CFG clip%':>9}")
    digits_layers = {"input 1, input 3 (former auto)": ("input 1, input 3", 1),
                     "input 3 (auto: lowest resolution)": ("input 3", 2), "middle 0": ("middle 0", 2),
                     "input 1 (full resolution)": ("input 1", 1)}
    cfg_clip = {size: digits_run(None, size, args)[2] for size in args.sizes}
    for label, (layers, downsampling) in digits_layers.items():
        for size in args.sizes:
            change, relative, clipped = digits_run(layers, size, args)
            tokens = (size // downsampling) ** 2
            print(f"{'digits ' + label:42} {size:>4}²  {tokens:>7} {change:>11.3f} {relative:>13.3f} {clipped:>6.1f} "
                  f"{cfg_clip[size]:>9.1f}", flush=True)
    for size in args.sizes:
        change, relative = flux_run(size, args)
        print(f"{'tiny random Flux, auto (double 1)':42} {size:>4}²  {(size // 2) ** 2:>7} {change:>11.3f} "
              f"{relative:>13.3f} {'–':>6} {'–':>9}", flush=True)


if __name__ == "__main__":
    main()
