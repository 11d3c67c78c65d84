"""Model passes, wall time and quality of Adaptive Guidance / LinearAG vs plain CFG.

    python benchmarks/adaptive_cost.py [--steps 30] [--samples 1024] [--seeds 3] [--digits] [--comfyui]

Part 1 (always; pure torch): Euler sampling on an exact class-conditional Gaussian mixture (the
denoisers of tests/core/gmm.py), eps (Karras σ) and flow (shifted σ). The guided target is CFG at
the same scale; the table gives model passes (cond + uncond), their change vs CFG, and two
quality figures, mean ± spread over seeds: **FD→CFG**, the Fréchet distance between the method's
samples and CFG samples from *other* seeds (so the CFG row is the sampling-noise floor: a method
within noise of CFG has the same figure), **paired err**, the mean ‖x − x_CFG‖/‖x_CFG‖ on the same
noise, and **FD→p(x|c)**, the distance to the true conditional distribution N(μ_c, s²I) (closed
form on its side; guidance moves samples away from it by design, so CFG's own value is the
target); plus adherence (Bayes-classifier accuracy to the requested class).

Part 2 (``--digits``, needs a ComfyUI checkout and scikit-learn): the embedded digits model, a real ε
network, through ComfyUI's KSampler path (batch of 100, one sample per digit and seed): model passes counted
per forward, adherence, Fréchet distance to held-out digits, diversity, clipped pixels and the paired error
against CFG on the same noise, per setting of ``DIGIT_CASES`` and cfg (``--digits-scales``).

Part 3 (``--comfyui``, needs a ComfyUI checkout): wall time and model passes per run on tiny
random-weight ComfyUI models through KSampler, AG vs CFG (random weights make the switch point
arbitrary: this part measures the cost mechanics, not quality).
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
import tests.conftest  # noqa: E402,F401  (registers the package as guidance_kit)
from guidance_kit.guiders.methods.adaptive_guidance import AdaptiveGuidance  # noqa: E402
from guidance_kit.guiders.plan import GuidancePlan  # noqa: E402
from tests.core.gmm import GaussianMixture, flow_sigmas, karras_sigmas  # noqa: E402
from tests.core.helpers import sample_plan  # noqa: E402
# isort: on

SHAPE = (2, 8, 8)
SCALE = 4.0
LABEL = 1

CASES: dict[str, AdaptiveGuidance | None] = {
    "CFG": None,
    "LinearAG only (default: γ̄ > 1, refresh 2)": AdaptiveGuidance(threshold=1.01, linear=True),
    "LinearAG only, refresh 3": AdaptiveGuidance(threshold=1.01, linear=True, refresh_every=3),
    "AG γ̄ 0.99 from 50%": AdaptiveGuidance(threshold=0.99, linear=False),
    "AG γ̄ 0.999 from 50%": AdaptiveGuidance(threshold=0.999, linear=False),
    "AG γ̄ 0.99 from 30%": AdaptiveGuidance(threshold=0.99, start_percent=0.3, linear=False),
    "LinearAG + AG γ̄ 0.99 from 50%": AdaptiveGuidance(threshold=0.99, linear=True),
}


def mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(7)
    directions = torch.randn((3,) + SHAPE, generator=g, dtype=torch.float64)
    directions = directions / directions.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    return GaussianMixture(1.1 * directions, std=1.0)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def frechet(mean_a, cov_a, mean_b, cov_b) -> float:
    root_b = _sqrtm_psd(cov_b)
    middle = _sqrtm_psd(root_b @ cov_a @ root_b)
    return float((mean_a - mean_b).square().sum() + torch.trace(cov_a + cov_b - 2 * middle))


def moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = samples.flatten(1).double()
    return flat.mean(0), torch.cov(flat.T)


def run_gmm(steps: int, n: int, seeds: int) -> None:
    gmm = mixture()
    d = gmm.means[0].numel()
    true_mean, true_cov = gmm.means[LABEL].flatten(), torch.eye(d, dtype=torch.float64) * gmm.std ** 2
    for parameterization, sigmas in (("eps (Karras)", karras_sigmas(steps)), ("flow (shift 3)", flow_sigmas(steps))):
        kind = "ve" if parameterization.startswith("eps") else "flow"
        print(f"\n### Exact mixture, {parameterization}, {steps} Euler steps, CFG scale {SCALE}, {n} samples × "
              f"{seeds} seeds\n")
        print("| method | passes | vs CFG | time/run | FD→CFG | paired err | FD→p(x|c) | adherence |")
        print("|---|---|---|---|---|---|---|---|")
        paired = [sample_plan(GuidancePlan(), gmm, LABEL, SCALE, sigmas, n=n, seed=s,
                              parameterization=kind)[0] for s in range(seeds)]
        references = [moments(sample_plan(GuidancePlan(), gmm, LABEL, SCALE, sigmas, n=n, seed=100 + s,
                                          parameterization=kind)[0]) for s in range(seeds)]
        plain_passes = 2 * steps
        for name, settings in CASES.items():
            plan = GuidancePlan.of(settings)
            fd_cfg, fd_true, acc, times, passes, errors = [], [], [], [], [], []
            for s in range(seeds):
                start = time.perf_counter()
                samples, den = sample_plan(plan, gmm, LABEL, SCALE, sigmas, n=n, seed=s, parameterization=kind)
                times.append(time.perf_counter() - start)
                passes.append(den.calls["cond"] + den.calls["uncond"])
                fd_cfg.append(frechet(*moments(samples), *references[s]))
                errors.append(float(((samples - paired[s]).flatten(1).norm(dim=1)
                                     / paired[s].flatten(1).norm(dim=1)).mean()))
                fd_true.append(frechet(*moments(samples), true_mean, true_cov))
                acc.append(float((gmm.classify(samples) == LABEL).double().mean()))
            mean_passes = statistics.mean(passes)
            print(f"| {name} | {mean_passes:.1f} | {100 * (mean_passes / plain_passes - 1):+.0f}% | "
                  f"{statistics.median(times) * 1000:.0f} ms | {_pm(fd_cfg)} | {_pm(errors, 3)} | {_pm(fd_true)} | "
                  f"{_pm(acc, 3)} |")


def _pm(values: list[float], digits: int = 2) -> str:
    mean = statistics.mean(values)
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def run_comfyui(steps: int, repeats: int) -> None:
    import logging

    # isort: off
    from tests.comfyui.harness import counted, ksample, out, tiny_model  # first: puts ComfyUI on sys.path
    from guidance_kit.nodes import adaptive as ag
    # isort: on

    logging.getLogger("guidance_kit").setLevel(logging.WARNING)

    print(f"\n### Tiny ComfyUI models (random weights), KSampler euler, {steps} steps, cfg {SCALE}\n")
    print("| family | case | passes/run | vs CFG | s/run | ×CFG time |")
    print("|---|---|---|---|---|---|")
    settings = {"CFG": None, "AG γ̄ −1 (cond only)": (-1.0, False), "AG γ̄ 0.99": (0.99, False),
                "LinearAG only": (1.01, True)}
    for family in ("sd15", "flux", "sd3", "wan21"):
        base = tiny_model(family)
        results = {}
        for name, s in settings.items():
            model = base if s is None else out(ag.AdaptiveGuidanceNode.execute(
                base, s[0], 0.5, "uncond and branches", s[1], 3, 2))
            model, counter = counted(model)
            ksample(model, family, SCALE, steps)  # warm-up
            times = []
            for _ in range(repeats):
                counter.batches.clear()
                start = time.perf_counter()
                ksample(model, family, SCALE, steps)
                times.append(time.perf_counter() - start)
            results[name] = (sum(counter.batches), statistics.median(times))
        plain_passes, plain_time = results["CFG"]
        for name, (passes, seconds) in results.items():
            print(f"| {family} | {name} | {passes} | {100 * (passes / plain_passes - 1):+.0f}% | {seconds:.3f} | "
                  f"{seconds / plain_time:.2f} |")


DIGIT_CASES: dict[str, dict | None] = {
    "CFG": None,
    "AG γ̄ 0.99 from 50% (old default)": dict(threshold=0.99, start_percent=0.5, linear_ag=False),
    "AG γ̄ 0.999 from 50%": dict(threshold=0.999, start_percent=0.5, linear_ag=False),
    "LinearAG γ̄ 0.99 from 50%": dict(threshold=0.99, start_percent=0.5, linear_ag=True),
    "LinearAG γ̄ 0.999 from 50%": dict(threshold=0.999, start_percent=0.5, linear_ag=True),
    "LinearAG only (γ̄ > 1)": dict(threshold=1.01, start_percent=0.5, linear_ag=True),
    "LinearAG only, refresh 3": dict(threshold=1.01, start_percent=0.5, linear_ag=True, refresh_every=3),
    "AG γ̄ 0.99 from 80%": dict(threshold=0.99, start_percent=0.8, linear_ag=False),
    "LinearAG γ̄ 0.99 from 80%": dict(threshold=0.99, start_percent=0.8, linear_ag=True),
    "LinearAG γ̄ 0.99 from 90%": dict(threshold=0.99, start_percent=0.9, linear_ag=True),
}


def run_digits(steps: int, scales: list[float], seeds: int, cases: list[str] | None = None) -> None:
    """The embedded digits model (a real ε-prediction network, ComfyUI's KSampler path, batch of 100)."""
    import logging

    # isort: off
    import compare  # the pack as guidance_kit, ComfyUI on sys.path
    compare.import_pack()
    from guidance_kit.digits.comfy_setup import import_comfyui
    import_comfyui(None, cpu=True)
    import comfy.patcher_extension
    from guidance_kit.comparison.runs import held_out_digits
    from guidance_kit.digits import sampling
    from guidance_kit.digits.metrics import DigitsEvaluator
    from guidance_kit.digits.model import cached_digits_model
    from guidance_kit.nodes import adaptive as ag
    # isort: on

    logging.getLogger("guidance_kit").setLevel(logging.WARNING)
    digits = cached_digits_model()
    evaluator = DigitsEvaluator(held_out_digits())
    labels = [d for _ in range(10) for d in range(10)]
    selected = {k: v for k, v in DIGIT_CASES.items() if cases is None or k in cases or v is None}
    print(f"\n### Embedded digits model (eps), KSampler euler/normal, {steps} steps, 100 samples × {seeds} seeds\n")
    print("FD = Fréchet distance to held-out digits (lower is better), div = within-class diversity, "
          "paired = mean ‖x − x_CFG‖/‖x_CFG‖ on the same noise\n")
    print("| cfg | method | passes | vs CFG | acc | FD | div | clip% | paired |")
    print("|---|---|---|---|---|---|---|---|---|")
    for scale in scales:
        reference = {}
        rows = []
        for name, settings in selected.items():
            model = digits.patcher.clone()
            if settings is not None:
                model = ag.AdaptiveGuidanceNode.execute(
                    model, settings["threshold"], settings["start_percent"], "uncond and branches",
                    settings["linear_ag"], 3, settings.get("refresh_every", 2)).result[0]
            counted: list[int] = []

            def count(executor, x, *args, _counted=counted, **kwargs):
                _counted.append(int(x.shape[0]))
                return executor(x, *args, **kwargs)

            model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "benchmark_counter", count)
            metrics, passes, paired = [], [], []
            for seed in range(seeds):
                counted.clear()
                samples = sampling.sample(model, digits, labels, seed, scale, steps)
                passes.append(sum(counted) / len(labels))
                metrics.append(evaluator.evaluate(samples, torch.tensor(labels)).as_dict())
                if settings is None:
                    reference[seed] = samples
                paired.append(float(((samples - reference[seed]).flatten(1).norm(dim=1)
                                     / reference[seed].flatten(1).norm(dim=1)).mean()))
            rows.append((name, statistics.mean(passes), metrics, paired))
        plain = rows[0][1]
        for name, mean_passes, metrics, paired in rows:
            def col(key, digits_=2, factor=1.0, metrics=metrics):
                return _pm([m[key] * factor for m in metrics], digits_)

            print(f"| {scale:g} | {name} | {mean_passes:.1f} | {100 * (mean_passes / plain - 1):+.0f}% | "
                  f"{col('adherence', 3)} | {col('frechet', 1)} | {col('diversity')} | {col('clipped', 1, 100.0)} | "
                  f"{_pm(paired, 3)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--comfyui", action="store_true", help="also time tiny ComfyUI models")
    parser.add_argument("--digits", action="store_true", help="also the embedded digits model (real network)")
    parser.add_argument("--digits-scales", type=float, nargs="+", default=[3.0, 5.0, 7.0])
    parser.add_argument("--digits-steps", type=int, default=20)
    parser.add_argument("--digits-cases", nargs="+", default=None, help="names of DIGIT_CASES to run (CFG always)")
    parser.add_argument("--no-mixture", action="store_true", help="skip the exact-mixture tables")
    args = parser.parse_args()
    if not args.no_mixture:
        run_gmm(args.steps, args.samples, args.seeds)
    if args.digits:
        run_digits(args.digits_steps, args.digits_scales, args.seeds, args.digits_cases)
    if args.comfyui:
        run_comfyui(args.steps, args.repeats)


if __name__ == "__main__":
    main()
