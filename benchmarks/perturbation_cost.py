"""Per-step cost of the perturbation methods vs plain CFG and vs ComfyUI core's own nodes (CPU).

    python benchmarks/perturbation_cost.py [--steps 12] [--repeats 5] [--families sd15,sdxl_like,flux,sd3,wan21]

Needs a ComfyUI checkout (COMFYUI_PATH or ~/ComfyUI). For every method: median ms per step over
interleaved runs, the ratio to plain CFG, model forwards per step, batch rows per step, and whether
the output differs from plain CFG (core PAG and core SkipLayerGuidanceDiT do nothing on families
they do not support, at full extra cost). Our branch runs inside the cond/uncond forward (1
forward, 3 rows); core's run a second forward (2 forwards, 3 rows). On tiny CPU models the time
mostly measures per-forward overhead; on a full-size GPU model the row count is what costs.
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
from guidance_kit.nodes import perturbation as P  # noqa: E402
from guidance_kit.nodes import attention_methods as A  # noqa: E402
from guidance_kit.nodes import spatial_methods as S  # noqa: E402
from guidance_kit.nodes import sag as SAG  # noqa: E402
from guidance_kit.nodes.runtime.blocks import block_layout  # noqa: E402
from guidance_kit.nodes.runtime.families import family_of  # noqa: E402
from comfy_extras.nodes_pag import PerturbedAttentionGuidance  # noqa: E402
from comfy_extras.nodes_sag import SelfAttentionGuidance  # noqa: E402
from comfy_extras.nodes_slg import SkipLayerGuidanceDiT  # noqa: E402
# isort: on

CFG = 5.0
WHOLE_RUN = dict(schedule="constant", start_percent=0.0, end_percent=1.0)


def core_slg_layers(model) -> tuple[str, str]:
    """The same blocks as our skip-layer 'auto' selection, in core's double/single syntax."""
    spec = family_of(model, "bench")
    layout = block_layout(model, spec)
    blocks = P._blocks("bench", "SLG", "auto", spec, layout)
    double = ", ".join(str(i) for g, i in blocks if g == "double")
    single = ", ".join(str(i) for g, i in blocks if g == "single")
    return double, single


def cases(family: str) -> dict:
    base = tiny_model(family)
    is_unet = family == "sd15"
    out_cases = {
        "CFG (plain)": lambda m: m,
        "PAG": lambda m: out(P.PAGNode.execute(m, 3.0, "auto", **WHOLE_RUN)),
        "SEG (σ=∞)": lambda m: out(P.SEGNode.execute(m, 3.0, 10000.0, "auto", **WHOLE_RUN)),
        "SEG (σ=10)": lambda m: out(P.SEGNode.execute(m, 3.0, 10.0, "auto", **WHOLE_RUN)),
        "TPG": lambda m: out(P.TPGNode.execute(m, 3.0, "auto", 0, **WHOLE_RUN)),
        "Skip-layer": lambda m: out(P.SkipLayerNode.execute(m, 2.8, "auto", **WHOLE_RUN)),
        "S²-Guidance": lambda m: out(P.S2GuidanceNode.execute(m, 0.25, 0.6, "auto", 0, **WHOLE_RUN)),
        "TSG": lambda m: out(P.TSGNode.execute(m, 1.5, 0.1, 0, **WHOLE_RUN)),
        "ICG": lambda m: out(P.ICGNode.execute(m, 0)),
        "PAG + Skip-layer": lambda m: out(P.SkipLayerNode.execute(out(P.PAGNode.execute(m, 3.0, "auto",
                                                                                          **WHOLE_RUN)),
                                                                  2.8, "auto", **WHOLE_RUN)),
        "core PAG": lambda m: out(PerturbedAttentionGuidance.execute(m, 3.0)),
    }
    if family == "sd3":
        del out_cases["TPG"]
    if not is_unet:
        double, single = core_slg_layers(base)
        out_cases["core SkipLayerGuidanceDiT"] = lambda m: out(SkipLayerGuidanceDiT.execute(
            m, 2.8, 0.0, 1.0, double_layers=double, single_layers=single))
    else:
        out_cases["core SkipLayerGuidanceDiT"] = lambda m: out(SkipLayerGuidanceDiT.execute(
            m, 2.8, 0.0, 1.0, double_layers="0", single_layers=""))
    if family in ("sd15", "wan21", "ltxv"):  # PLADIS: text cross-attention families (no extra branch)
        out_cases["PLADIS"] = lambda m: out(A.PLADISNode.execute(m, 2.0, "entmax1.5"))
    out_cases["ERG"] = lambda m: out(A.ERGNode.execute(m, 2.0, 2.0, "auto", **WHOLE_RUN))
    out_cases["SWG"] = lambda m: out(S.SWGNode.execute(m, 1.0, 0.75, 2, **WHOLE_RUN))
    if is_unet:  # SAG: UNet middle-block self-attention; its degraded uncond is a second, dependent call
        out_cases["SAG"] = lambda m: out(SAG.SAGNode.execute(m, 0.5, 2.0, **WHOLE_RUN))
        out_cases["core SAG"] = lambda m: out(SelfAttentionGuidance.execute(m, 0.5, 2.0))
    return out_cases


def measure(family: str, steps: int, repeats: int) -> dict:
    plain = ksample(tiny_model(family), family, CFG, steps)
    models = {}
    for name, build in cases(family).items():
        model, counter = counted(build(tiny_model(family)))
        result = ksample(model, family, CFG, steps)  # warm-up, and the output for the 'changes' column
        forwards, rows = counter.calls / steps, sum(counter.batches) / steps
        models[name] = (model, forwards, rows, rel_diff(result, plain))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, (model, *_rest) in models.items():
            start = time.perf_counter()
            ksample(model, family, CFG, steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: (statistics.median(times[name]), f, r, d) for name, (_, f, r, d) in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default="sd15,flux,sd3,wan21,hunyuan_video,qwen_image,ltxv,lumina2,mochi,"
                                              "cosmos_predict2,hidream,cosmos")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, 1 thread, CPU, {args.steps} euler steps, cfg {CFG}, median of {args.repeats} "
          f"interleaved runs. fwd = model forwards per step, rows = batch rows per step (plain CFG: 1 / 2), "
          f"changes = max relative difference of the final latent from plain CFG (0 = the node did nothing)\n")
    for family in args.families.split(","):
        results = measure(family, args.steps, args.repeats)
        base = results["CFG (plain)"][0]
        print(f"## {family}")
        print(f"{'method':28s} {'ms/step':>8s} {'×CFG':>6s} {'fwd':>5s} {'rows':>5s} {'changes':>8s}")
        for name, (seconds, forwards, rows, diff) in results.items():
            print(f"{name:28s} {seconds * 1e3:8.2f} {seconds / base:6.2f} {forwards:5.2f} {rows:5.2f} {diff:8.3f}")
        print()


if __name__ == "__main__":
    main()
