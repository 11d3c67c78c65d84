"""One sampler call vs the same run split over two: the relative difference per method.

    python benchmarks/split_runs.py [--steps 20] [--split 10] [--families sd15 flux]

A run split over several sampler calls (KSamplerAdvanced 0–10 then 10–20, base → refiner, SamplerCustomAdvanced
with SplitSigmas) must get the same guidance as one call. For each row (a method with the settings named) on tiny
random-weight ComfyUI models, euler/normal, cfg 5, it prints max |split − single| / max |single| for the split
through KSamplerAdvanced and through SamplerCustomAdvanced + SplitSigmas. Plain CFG's own figure is the floor
(0 with euler: the same steps in the same order). Needs a ComfyUI checkout (as the test command finds it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

# isort: off
import tests.conftest  # noqa: E402,F401  (registers the package as guidance_kit)
from tests.comfyui.harness import conditioning, latent, nodes, rel_diff, tiny_model  # noqa: E402
# isort: on

CFG = 5.0
SEED = 3

# (label, [(node id, inputs that differ from the node's defaults)]): the rows, then every method as shipped
ROWS = [
    ("CFG (plain)", []),
    ("CFG Schedule (linear_increasing)", [("CFGSchedule", {"schedule": "linear_increasing"})]),
    ("β-CFG", [("BetaCFG", {})]),
    ("CFG-Zero* (zero-init 1 step)", [("CFGZeroStar", {"zero_init_steps": 1})]),
    ("S²-Guidance", [("S2Guidance", {})]),
    ("Adaptive Guidance + PAG", [("PAG", {}), ("AdaptiveGuidance", {"threshold": 0.5, "start_percent": 0.3})]),
    ("APG with momentum", [("APG", {})]),
    ("APG, momentum 0", [("APG", {"momentum": 0.0})]),
    ("TCFG", [("TCFG", {})]),
    ("FDG", [("FDG", {})]),
    ("Rescale", [("Rescale", {})]),
    ("PAG", [("PAG", {})]),
    ("SEG", [("SEG", {})]),
    ("TPG", [("TPG", {})]),
    ("Skip-Layer", [("SkipLayer", {})]),
    ("TSG", [("TSG", {})]),
    ("ICG", [("ICG", {})]),
    ("NAG", [("NAG", {})]),
    ("S-CFG", [("SCFG", {})]),
]


def node_by_id():
    from guidance_kit.nodes import node_list

    return {n.GET_SCHEMA().node_id.removeprefix("GuidanceKit_"): n for n in node_list()}


def apply_row(model, family: str, stack, registry):
    for node_id, overrides in stack:
        node = registry[node_id]
        values = {}
        for port in node.GET_SCHEMA().inputs:
            if port.id == "model":
                values["model"] = model
            elif port.id in overrides:
                values[port.id] = overrides[port.id]
            elif port.get_io_type() == "CONDITIONING":
                values[port.id] = conditioning(family, 3)
            elif getattr(port, "default", None) is not None:
                values[port.id] = port.default
        result = node.execute(**values)
        model = getattr(result, "result", result)[0]
    return model


def split_difference(model, family: str, steps: int, split: int) -> tuple[float, float]:
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom

    positive, negative = conditioning(family, 1), conditioning(family, 2)
    lat = {"samples": latent(family)}
    single = nodes.common_ksampler(model, SEED, steps, CFG, "euler", "normal", positive, negative, lat)[0]["samples"]
    advanced = nodes.KSamplerAdvanced()
    head = advanced.sample(model, "enable", SEED, steps, CFG, "euler", "normal", positive, negative, lat, 0, split,
                           "enable")[0]
    tail = advanced.sample(model, "disable", SEED, steps, CFG, "euler", "normal", positive, negative, head, split,
                           steps, "disable")[0]["samples"]
    guider = custom.CFGGuider().get_guider(model, positive, negative, CFG)[0]
    sigmas = custom.BasicScheduler().get_sigmas(model, "normal", steps, 1.0)[0]
    high, low = custom.SplitSigmas().get_sigmas(sigmas, split)
    sampler = comfy.samplers.sampler_object("euler")
    sample = custom.SamplerCustomAdvanced().sample
    first = sample(custom.Noise_RandomNoise(SEED), guider, sampler, high, lat)[0]
    second = sample(custom.Noise_EmptyNoise(), guider, sampler, low, first)[0]["samples"]
    return rel_diff(tail, single), rel_diff(second, single)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--split", type=int, default=10)
    parser.add_argument("--families", nargs="+", default=["sd15", "flux"])
    args = parser.parse_args()
    import logging

    logging.getLogger("guidance_kit").setLevel(logging.ERROR)
    registry = node_by_id()
    header = " | ".join(f"{f} KSamplerAdvanced | {f} SplitSigmas" for f in args.families)
    print(f"Split at step {args.split} of {args.steps}, euler/normal, cfg {CFG}: max|split − single| / max|single|\n")
    print(f"| method | {header} |")
    print("|---" * (1 + 2 * len(args.families)) + "|")
    for label, stack in ROWS:
        if any(node_id not in registry for node_id, _ in stack):
            continue
        cells = []
        for family in args.families:
            try:
                model = apply_row(tiny_model(family), family, stack, registry)
                advanced, custom_split = split_difference(model, family, args.steps, args.split)
                cells += [f"{advanced:.1e}", f"{custom_split:.1e}"]
            except Exception as e:  # a method that refuses this family: say why, keep the table
                cells += [f"refused: {str(e)[:40]}…"] * 2
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
