"""β-CFG's strength vs latent size: the paper's L2 normalisation against the pack's per-element RMS (default).

    python benchmarks/beta_cfg_strength.py [--steps 8] [--scales 1 3 5 8] [--seeds 2] [--no-tiny] [--no-digits]

Part 1 (needs a ComfyUI checkout): tiny random-weight ComfyUI models, SD1.5's UNet class (eps) and Flux (flow),
sampled through KSampler at two latent sizes a factor 2 apart per side (Flux 64² and 128², the UNet 32² and 64²:
its full-resolution attention makes 128² too slow on a CPU). Per model evaluation a post-cfg function measures
the guidance in the model's own prediction space, (U − D̂)/σ (ε on eps, the velocity on flow models): its
per-element RMS at the β peak (mid-run) and ``w_eff`` = that RMS over RMS(ε_c − ε_u) (the CFG weight
that would give the same step; plain CFG: w). The effect column is the per-element RMS change of the final
latent vs unguided (unconditional, cfg 0) sampling on the same noise, relative to its RMS: how far the
guidance moved the sample (β-CFG and CFG both start from the unconditional prediction).

Part 2: the embedded digits model (a real ε network, 8×8 latent, batch of 100): adherence, Fréchet distance
to held-out digits, diversity and clipped pixels per method and cfg, and the exact Gaussian mixture fitted to
the digits (W2² to p(x0|c), Bayes adherence, per-pixel spread vs the data's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)

METHODS = {"CFG": None, "β-CFG L2 (paper)": "l2", "β-CFG RMS (default)": "rms"}


def setup():
    # isort: off
    import tests.conftest  # noqa: F401  (registers the package as guidance_kit)
    import tests.comfyui.harness  # noqa: F401  (ComfyUI on sys.path, on the CPU)
    # isort: on
    import logging

    logging.getLogger("guidance_kit").setLevel(logging.ERROR)


def beta_model(patcher, normalization):
    from guidance_kit.nodes import cfg_methods as cm

    if normalization is None:
        return patcher.clone()
    label = {"l2": "L2 (paper)", "rms": "per-element RMS (resolution-independent)"}[normalization]
    return cm.BetaCFGNode.execute(patcher.clone(), 2.0, 2.0, 1.0, False, label).result[0]


class GuidanceProbe:
    """Post-cfg function: per evaluation, the guidance's per-element RMS and w_eff in (x − D)/σ space."""

    def __init__(self):
        self.records: list[tuple[float, float, float]] = []  # (σ, guidance RMS, RMS of ε_c − ε_u)

    def __call__(self, args):
        sigma = args["sigma"].reshape(-1, *([1] * (args["input"].ndim - 1)))
        guidance = (args["uncond_denoised"] - args["denoised"]) / sigma
        direction = (args["uncond_denoised"] - args["cond_denoised"]) / sigma
        rms = lambda t: float(t.float().square().mean().sqrt())  # noqa: E731
        self.records.append((float(args["sigma"].reshape(-1)[0]), rms(guidance), rms(direction)))
        return args["denoised"]

    def at_middle(self) -> tuple[float, float]:
        _, guidance, direction = self.records[len(self.records) // 2]
        return guidance, guidance / max(direction, 1e-12)


def run_tiny(steps: int, scales: list[float], seeds: int) -> None:
    import comfy.model_patcher
    import comfy.sample

    from tests.comfyui.harness import conditioning, tiny_model

    print(f"\n### Tiny random-weight ComfyUI models, KSampler euler/normal, {steps} steps, β(2, 2), γ 1, "
          f"{seeds} seeds\n")
    print("guidance RMS = per-element RMS of the guidance (U − D̂)/σ at the mid-run step (β at its peak, 1.5); "
          "w_eff = guidance RMS / RMS(ε_c − ε_u) there (plain CFG: w); effect = RMS(x − x_u)/RMS(x_u) of the "
          "final latent vs unconditional sampling (cfg 0) on the same noise\n")
    print("| model | latent | cfg | method | guidance RMS | w_eff | effect |")
    print("|---|---|---|---|---|---|---|")
    channels = {"sd15": 4, "flux": 16}
    # two sizes a factor 2 apart per side; the tiny UNet's full-resolution attention makes 128² too slow on a CPU
    sizes = {"sd15": (32, 64), "flux": (64, 128)}
    for family, label in (("sd15", "SD1.5 UNet (eps)"), ("flux", "Flux (flow)")):
        base = tiny_model(family)
        for size in sizes[family]:
            shape = (1, channels[family], size, size)
            unguided = {}
            for scale in scales:
                for name, normalization in METHODS.items():
                    values = []
                    for seed in range(seeds):
                        latent = torch.zeros(shape)
                        noise = comfy.sample.prepare_noise(latent, seed)
                        positive, negative = conditioning(family, 1), conditioning(family, 2)
                        if seed not in unguided:
                            unguided[seed] = comfy.sample.sample(
                                base.clone(), noise, steps, 0.0, "euler", "normal", positive, negative, latent,
                                disable_pbar=True, seed=seed)
                        probe = GuidanceProbe()
                        model = beta_model(base, normalization)
                        model.set_model_sampler_post_cfg_function(probe, disable_cfg1_optimization=True)
                        out = comfy.sample.sample(model, noise, steps, scale, "euler", "normal", positive, negative,
                                                  latent, disable_pbar=True, seed=seed)
                        ref = unguided[seed]
                        effect = float((out - ref).square().mean().sqrt() / ref.square().mean().sqrt())
                        values.append((*probe.at_middle(), effect))
                    g, w, e = (statistics.mean(v[i] for v in values) for i in range(3))
                    print(f"| {label} | {channels[family]}×{size}² | {scale:g} | {name} | {g:.4f} | {w:.2f} | "
                          f"{e:.3f} |", flush=True)


def run_digits(steps: int, scales: list[float], seeds: int, extra_rms_scales: list[float]) -> None:
    import comfy.samplers

    from guidance_kit.comparison.runs import held_out_digits
    from guidance_kit.digits import sampling
    from guidance_kit.digits.data import load_split
    from guidance_kit.digits.metrics import DigitsEvaluator
    from guidance_kit.digits.mixture import DiagonalGaussianMixture, sample_with_plan, summarize
    from guidance_kit.digits.model import cached_digits_model
    from guidance_kit.guiders.methods.beta_cfg import BetaCFG
    from guidance_kit.guiders.plan import GuidancePlan

    digits = cached_digits_model()
    evaluator = DigitsEvaluator(held_out_digits())
    labels = [d for _ in range(10) for d in range(10)]
    cases = [(name, n, s) for s in scales for name, n in METHODS.items()]
    cases += [("β-CFG RMS (default)", "rms", s) for s in extra_rms_scales]
    print(f"\n### Embedded digits model (ε, 1×8×8 latent), KSampler euler/normal, {steps} steps, 100 samples × "
          f"{seeds} seeds, β(2, 2), γ 1\n")
    print("| cfg | method | acc | FD | div | clip% |")
    print("|---|---|---|---|---|---|")
    for name, normalization, scale in cases:
        model = beta_model(digits.patcher, normalization)
        metrics = [evaluator.evaluate(sampling.sample(model, digits, labels, seed, scale, steps),
                                      torch.tensor(labels)).as_dict() for seed in range(seeds)]

        def col(key, digits_=2, factor=1.0, metrics=metrics):
            values = [m[key] * factor for m in metrics]
            return f"{statistics.mean(values):.{digits_}f} ± {statistics.pstdev(values):.{digits_}f}"

        print(f"| {scale:g} | {name} | {col('adherence', 3)} | {col('frechet', 1)} | {col('diversity')} | "
              f"{col('clipped', 1, 100.0)} |", flush=True)

    split = load_split()
    mixture = DiagonalGaussianMixture.fit(split.train_images, split.train_labels)
    sampling_ = digits.patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling_, "normal", steps).tolist()
    per_class = 300
    mixture_labels = torch.arange(10).repeat_interleave(per_class)
    print(f"\n### Exact Gaussian mixture fitted to the digits (1×8×8), Euler {steps} steps, {per_class} samples per "
          f"class\n")
    print("spread = per-pixel std of the samples / the data's, per class, averaged (1 = the data's spread)\n")
    print("| cfg | method | W2² to p(x0|c) | Bayes adherence | spread |")
    print("|---|---|---|---|---|")
    for name, normalization, scale in cases:
        plan = GuidancePlan() if normalization is None else GuidancePlan.of(BetaCFG(normalization=normalization))
        samples = sample_with_plan(plan, mixture, mixture_labels, scale, sigmas, 0, sampling_.percent_to_sigma)
        result = summarize(mixture, samples, mixture_labels)
        spread = float(torch.stack([samples[mixture_labels == c].flatten(1).std(0).mean()
                                    / mixture.variances[c].sqrt().mean() for c in range(10)]).mean())
        print(f"| {scale:g} | {name} | {result.distance:.3f} | {result.adherence:.3f} | {spread:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps of the tiny-model runs (default 8)")
    parser.add_argument("--digits-steps", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0, 8.0])
    parser.add_argument("--rms-scales", type=float, nargs="*", default=[16.0, 32.0, 48.0],
                        help="extra cfg values for the RMS mode on the digits model")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--no-tiny", action="store_true")
    parser.add_argument("--no-digits", action="store_true")
    args = parser.parse_args()
    setup()
    if not args.no_tiny:
        run_tiny(args.steps, args.scales, args.seeds)
    if not args.no_digits:
        run_digits(args.digits_steps, args.scales, args.seeds, args.rms_scales)


if __name__ == "__main__":
    main()
