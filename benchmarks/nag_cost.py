"""Per-step cost of NAG vs plain sampling (cfg 1) and vs CFG, on tiny CPU models.

    python benchmarks/nag_cost.py [--steps 8] [--repeats 5] [--tokens 6] [--latent-scale 1]
                                  [--families sd15,flux,sd3,wan21,chroma,hunyuan_video,qwen_image,ltxv]

Needs a ComfyUI checkout (COMFYUI_PATH or ~/ComfyUI). Four runs per family: the model at cfg 1 (one
forward of one chunk per step), NAG at cfg 1, CFG at cfg 5 (two chunks) and CFG + NAG. Median ms per
step over interleaved runs, the ratio to plain cfg-1 sampling, model forwards and batch rows per step,
and the relative change of the final latent against the same run without NAG. NAG adds no forward and
no row: its cost is the NAG negative's text tokens in the text layers and the extra attention of the
prompt's rows (the paper, NVIDIA A100, full-size models: +12% to +87% per step, vs +100% for CFG).
``--tokens`` sets the prompt's and the NAG negative's token count, ``--latent-scale`` multiplies the
latent's height and width (more image tokens): tiny models at tiny sizes mostly measure per-call
overhead, larger sizes move the ratio towards what a full-size model pays.
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
from tests.comfyui import harness  # noqa: E402
from tests.comfyui.harness import conditioning, counted, ksample, out, rel_diff, tiny_model  # noqa: E402
from guidance_kit.nodes import nag as N  # noqa: E402
# isort: on

CFG = 5.0
MAX_LATENT_SCALE = {"sd3": 2}  # the tiny SD3's position table covers 32×32 latent pixels


def scaled_latent(family: str, scale: int) -> None:
    shape = list(harness.LATENT_SHAPES[family])
    factor = min(scale, MAX_LATENT_SCALE.get(family, scale))
    shape[-2:] = [shape[-2] * factor, shape[-1] * factor]
    harness.LATENT_SHAPES[family] = tuple(shape)


def measure(family: str, steps: int, repeats: int, tokens: int) -> dict:
    prompt = conditioning(family, 1, tokens=tokens)
    negative = conditioning(family, 2, tokens=tokens)
    nag_negative = conditioning(family, 3, tokens=tokens)
    base = tiny_model(family)
    with_nag = out(N.NAGNode.execute(base, nag_negative, N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0))
    runs = {"plain (cfg 1)": (base, 1.0), "NAG (cfg 1)": (with_nag, 1.0), f"CFG (cfg {CFG:g})": (base, CFG),
            f"CFG + NAG (cfg {CFG:g})": (with_nag, CFG)}

    def sample(model, cfg):
        return ksample(model, family, cfg, steps, positive=prompt, negative=negative)

    results = {}
    for name, (model, cfg) in runs.items():
        counted_model, counter = counted(model)
        result = sample(counted_model, cfg)  # warm-up, and the output for the 'changes' column
        reference = sample(base, cfg)
        results[name] = [counter.calls / steps, sum(counter.batches) / steps, rel_diff(result, reference), []]
    for _ in range(repeats):
        for name, (model, cfg) in runs.items():
            start = time.perf_counter()
            sample(model, cfg)
            results[name][3].append((time.perf_counter() - start) / steps)
    return {name: (statistics.median(times), f, r, d) for name, (f, r, d, times) in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=6, help="prompt / negative / NAG negative tokens")
    parser.add_argument("--latent-scale", type=int, default=1, help="multiplies the latent's height and width")
    parser.add_argument("--families", default="sd15,flux,sd3,wan21,chroma,hunyuan_video,qwen_image,ltxv")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, 1 thread, CPU, {args.steps} euler steps, {args.tokens} text tokens, latent "
          f"scale {args.latent_scale}, median of {args.repeats} interleaved runs. ×plain = time per step / plain "
          f"cfg-1 sampling; fwd = model forwards per step, rows = batch rows per step; changes = relative "
          f"difference of the final latent from the same run without NAG\n")
    for family in args.families.split(","):
        scaled_latent(family, args.latent_scale)
        results = measure(family, args.steps, args.repeats, args.tokens)
        base = results["plain (cfg 1)"][0]
        print(f"## {family} (latent {tuple(harness.LATENT_SHAPES[family][1:])})")
        print(f"{'run':24s} {'ms/step':>8s} {'×plain':>7s} {'fwd':>5s} {'rows':>5s} {'changes':>8s}")
        for name, (seconds, forwards, rows, diff) in results.items():
            print(f"{name:24s} {seconds * 1e3:8.2f} {seconds / base:7.2f} {forwards:5.2f} {rows:5.2f} {diff:8.3f}")
        print()


if __name__ == "__main__":
    main()
