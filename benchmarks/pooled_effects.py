"""How much the pooled text vector matters to ICG's independent condition and to NAG's negative, on tiny
CPU models (random weights: the figures show the mechanism's size on these models, not on trained ones).

    python benchmarks/pooled_effects.py [--steps 6] [--seeds 0,1,2]

Needs a ComfyUI checkout (COMFYUI_PATH or ~/ComfyUI).

ICG (SDXL, Flux, SD3, HunyuanVideo): the unconditional prediction of the first step (same x for every
variant) under the independent condition with a random pooled vector (the node) and with the prompt's
pooled vector kept (the pack's earlier behaviour). ``pooled share`` = ‖Û_indep − Û_keep‖ / ‖C − Û_indep‖:
the part of the guidance direction C − Û that the pooled vector alone accounts for. ``final`` = the relative
change of the sampled latent between the two (cfg 4).

NAG (Flux, SD3, HunyuanVideo; cfg 1, the family defaults): the relative change of the sampled latent when
the NAG negative's text is modulated with its own pooled vector (the node) instead of the prompt's, next
to the change NAG makes at all.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

# isort: off
import tests.conftest  # noqa: E402,F401  (registers the package as guidance_kit, finds ComfyUI)
from tests.comfyui import harness  # noqa: E402
from tests.comfyui import test_tsg_icg as tsg_icg  # noqa: E402  (adds the tiny SDXL to the harness)
from tests.comfyui.harness import ksample, out, rel_diff, tiny_model  # noqa: E402
from guidance_kit.guiders.methods.icg import IndependentCondition  # noqa: E402
from guidance_kit.guiders.plan import Branch  # noqa: E402
from guidance_kit.nodes.contributors import condition as IC  # noqa: E402
from guidance_kit.nodes import nag as N  # noqa: E402
from guidance_kit.nodes.common import add_method  # noqa: E402
# isort: on

CFG = 4.0


def icg_model(base, pooled: bool, seed: int):
    condition = IC.RandomCondition("ICG", seed, pooled=pooled)
    model = add_method(base, IndependentCondition(Branch("ICG", "cond", perturbation=condition)))
    IC.install(model)
    return model


class FirstStep:
    """Post-cfg function keeping the first step's conditional and unconditional predictions."""

    def __init__(self):
        self.cond = self.uncond = None

    def __call__(self, args):
        if self.cond is None:
            self.cond, self.uncond = args["cond_denoised"].clone(), args["uncond_denoised"].clone()
        return args["denoised"]


def first_step(model, family, steps):
    spy = FirstStep()
    m = model.clone()
    m.set_model_sampler_post_cfg_function(spy)
    final = tsg_icg.sample(m, family, cfg=CFG, steps=steps)
    return spy, final


def icg_row(family: str, steps: int, seeds: list[int]) -> str:
    shares, finals = [], []
    for seed in seeds:
        base = tiny_model(family)
        indep, final_indep = first_step(icg_model(base, True, seed), family, steps)
        keep, final_keep = first_step(icg_model(base, False, seed), family, steps)
        direction = (indep.cond - indep.uncond).norm()
        shares.append(float((indep.uncond - keep.uncond).norm() / direction))
        finals.append(rel_diff(final_indep, final_keep))
    return (f"| ICG | {family} | {statistics.mean(shares):.0%} (min {min(shares):.0%}, max {max(shares):.0%}) | "
            f"{statistics.mean(finals):.3f} |")


def nag_row(family: str, steps: int, seeds: list[int]) -> str:
    from unittest import mock

    own, effect = [], []
    for seed in seeds:
        base = tiny_model(family)
        negative = harness.conditioning(family, 50 + seed)
        prompt = harness.conditioning(family, 1)
        plain = ksample(base, family, 1.0, steps, positive=prompt)
        with_own = ksample(out(N.NAGNode.execute(base, negative, N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0)), family, 1.0,
                           steps, positive=prompt)
        with mock.patch.object(N.nag_modulation, "for_family", lambda spec, pooled, owner: None):
            with_prompts = ksample(out(N.NAGNode.execute(base, negative, N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0)),
                                   family, 1.0, steps, positive=prompt)
        own.append(rel_diff(with_own, with_prompts))
        effect.append(rel_diff(with_own, plain))
    return f"| NAG | {family} | {statistics.mean(own):.3f} | {statistics.mean(effect):.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"ICG, cfg {CFG:g}, {args.steps} steps, seeds {seeds}")
    print("| method | family | pooled share of C − Û (first step) | final latent: random vs kept pooled |")
    print("|---|---|---|---|")
    for family in ("sdxl", "flux", "sd3", "hunyuan_video"):
        print(icg_row(family, args.steps, seeds))
    print(f"\nNAG, cfg 1, family defaults, {args.steps} steps, NAG negatives of seeds {[50 + s for s in seeds]}")
    print("| method | family | final latent: own vs prompt's pooled | final latent: NAG vs none |")
    print("|---|---|---|---|")
    for family in ("flux", "sd3", "hunyuan_video"):
        print(nag_row(family, args.steps, seeds))


if __name__ == "__main__":
    main()
