"""Text tables for compare.py, and the ``metrics`` report on the embedded digits model.

The report measures every method at several cfg scales over several seeds (mean ± sample standard
deviation), the exact Gaussian-mixture benchmark for the methods that have an exact counterpart,
and an *equal effective strength* table: each method is set beside plain CFG at the cfg that gives
the same guidance strength, measured as the classifier's mean margin for the requested digit (its
logit minus the largest other; adherence alone saturates at 100%). CFG's values there are
interpolated along CFG's own curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .methods import ALL_METHODS, Row, parse_row
from .runs import CellFailed, EmbeddedRunner, mean_and_spread


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align_left: int = 1) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]

    def line(values):
        cells = [str(v).ljust(w) if i < align_left else str(v).rjust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def pm(values: Sequence[float], fmt: str = ".2f", scale: float = 1.0) -> str:
    mean, spread = mean_and_spread([v * scale for v in values if v is not None])
    if math.isnan(mean):
        return "—"
    return f"{format(mean, fmt)} ± {format(spread, fmt)}"


def progress_bar(total: int, description: str, enabled: bool = True):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="run", leave=False)


# ------------------------------------------------------------------------------------------------
# the metrics report on the embedded model
# ------------------------------------------------------------------------------------------------

METRIC_COLUMNS = (("adherence", "adherence", ".3f", 1.0), ("margin", "margin", ".2f", 1.0),
                  ("frechet", "Fréchet", ".2f", 1.0), ("diversity", "diversity", ".2f", 1.0),
                  ("clipped", "clipped %", ".1f", 100.0), ("mean_abs", "mean |x|", ".3f", 1.0))
CFG_CURVE_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.5, 9.0, 11.0, 13.0, 16.0, 20.0)


@dataclass
class Measurements:
    """metric → list over seeds, per (row label, scale)."""

    values: dict[tuple[str, float], dict[str, list[float]]] = field(default_factory=dict)
    seconds: dict[tuple[str, float], list[float]] = field(default_factory=dict)
    failed: dict[tuple[str, float, int], str] = field(default_factory=dict)  # cells no server could draw

    def add(self, label: str, scale: float, metrics: dict[str, float], seconds: float) -> None:
        bucket = self.values.setdefault((label, scale), {})
        for key, value in metrics.items():
            bucket.setdefault(key, []).append(value)
        self.seconds.setdefault((label, scale), []).append(seconds)

    def mean(self, label: str, scale: float, key: str) -> float:
        return mean_and_spread(self.values[(label, scale)][key])[0]


def measure(runner: EmbeddedRunner, rows: Sequence[Row], scales: Sequence[float], seeds: Sequence[int],
            bar=None, results: Measurements | None = None) -> Measurements:
    results = results or Measurements()
    for row in rows:
        for scale in scales:
            for seed in seeds:
                start = time.perf_counter()
                try:
                    samples = runner.samples(row, scale, seed)
                except CellFailed as e:  # drawn on servers: a cell that failed on every one
                    results.failed[(row.label, scale, seed)] = str(e)
                else:
                    # a runner that drew the samples elsewhere (ComfyUI servers) says how long that took
                    seconds = getattr(runner, "last_seconds", None) or time.perf_counter() - start
                    results.add(row.label, scale, runner.measure(samples), seconds)
                if bar is not None:
                    bar.update(1)
    return results


def method_table(results: Measurements, rows: Sequence[Row], scales: Sequence[float]) -> str:
    headers = ["method", "cfg"] + [title for _, title, _, _ in METRIC_COLUMNS] + ["s/run"]
    lines = []
    for row in rows:
        for scale in scales:
            values = results.values.get((row.label, scale))
            if values is None:
                lines.append([row.label, f"{scale:g}", "failed (see below)"] + [""] * len(METRIC_COLUMNS))
                continue
            lines.append([row.label, f"{scale:g}"]
                         + [pm(values[key], fmt, factor) for key, _, fmt, factor in METRIC_COLUMNS]
                         + [f"{np.mean(results.seconds[(row.label, scale)]):.2f}"])
    return format_table(headers, lines)


def reference_table(runner: EmbeddedRunner, seeds: Sequence[int]) -> str:
    """Real digits measured like generated ones: training digits (same count) against the held-out set."""
    from ..digits.data import load_split

    split = load_split()
    count = len(runner.labels)
    values: dict[str, list[float]] = {}
    for seed in seeds:
        chosen = _balanced_subset(split.train_labels, runner.digits, runner.samples_per_class, seed)
        metrics = runner.evaluator.evaluate(split.train_images[chosen], split.train_labels[chosen]).as_dict()
        for key, value in metrics.items():
            values.setdefault(key, []).append(value)
    headers = ["reference", "n"] + [title for _, title, _, _ in METRIC_COLUMNS]
    row = [f"real training digits vs held-out ({len(seeds)} draws)", str(count)]
    row += [pm(values[key], fmt, factor) for key, _, fmt, factor in METRIC_COLUMNS]
    return format_table(headers, [row])


def _balanced_subset(labels, digits, per_class: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for digit in digits:
        members = (labels == digit).nonzero().flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(chosen)


def _cfg_value_at(results: Measurements, cfg_label: str, curve_scales: list[float], scale: float, key: str) -> float:
    return float(np.interp(scale, curve_scales, [results.mean(cfg_label, s, key) for s in curve_scales]))


def equal_strength_table(results: Measurements, rows: Sequence[Row], scales: Sequence[float],
                         cfg_label: str = "CFG") -> str:
    """Each method beside CFG at the cfg of equal mean classifier margin."""
    curve_scales = sorted(s for (label, s) in results.values if label == cfg_label)
    if not curve_scales:
        return "(no CFG cell was drawn: no equal-strength table)"
    strength = np.array([results.mean(cfg_label, s, "margin") for s in curve_scales])
    monotone = np.maximum.accumulate(strength)  # guidance strength should not fall with cfg; ties resolved low
    compared = (("frechet", ".2f", 1.0), ("diversity", ".2f", 1.0), ("clipped", ".1f", 100.0),
                ("mean_abs", ".3f", 1.0))
    headers = ["method @ cfg", "margin", "CFG at equal strength", "Fréchet (method | CFG)",
               "diversity (method | CFG)", "clipped % (method | CFG)", "mean |x| (method | CFG)"]
    lines = []
    for row in rows:
        if row.label == cfg_label:
            continue
        for scale in scales:
            if (row.label, scale) not in results.values:
                lines.append([f"{row.label} @ {scale:g}", "failed"] + [""] * (len(compared) + 1))
                continue
            target = results.mean(row.label, scale, "margin")
            if target > monotone[-1] + 1e-9:
                lines.append([f"{row.label} @ {scale:g}", f"{target:.2f}", f"above CFG {curve_scales[-1]:g}"]
                             + [""] * len(compared))
                continue
            if target < monotone[0] - 1e-9:
                lines.append([f"{row.label} @ {scale:g}", f"{target:.2f}", f"below CFG {curve_scales[0]:g}"]
                             + [""] * len(compared))
                continue
            matched = float(np.interp(target, monotone, curve_scales))
            pairs = []
            for key, fmt, factor in compared:
                method_value = factor * results.mean(row.label, scale, key)
                cfg_value = factor * _cfg_value_at(results, cfg_label, curve_scales, matched, key)
                pairs.append(f"{format(method_value, fmt)} | {format(cfg_value, fmt)}")
            lines.append([f"{row.label} @ {scale:g}", f"{target:.2f}", f"{matched:.2f}"] + pairs)
    return format_table(headers, lines)


def mixture_table(runner: EmbeddedRunner, rows: Sequence[Row], scales: Sequence[float], seeds: Sequence[int],
                  samples_per_class: int = 300, bar=None) -> str:
    """The exact Gaussian-mixture benchmark for the rows that have an exact counterpart."""
    import comfy.samplers

    from ..digits.data import load_split
    from ..digits.mixture import DiagonalGaussianMixture, evaluate_plan, exact_sample_floor
    from .methods import plan_of_row

    split = load_split()
    mixture = DiagonalGaussianMixture.fit(split.train_images, split.train_labels)
    patcher = runner.model.patcher
    sampling = patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, runner.scheduler, runner.steps).tolist()
    headers = ["method", "cfg", "W2² to p(x0|c)", "Bayes adherence", "mean |x|"]
    floor = [exact_sample_floor(mixture, samples_per_class, seed) for seed in seeds]
    lines = [["exact samples (floor)", "", pm([f.distance for f in floor], ".3f"),
              pm([f.adherence for f in floor], ".3f"), pm([f.mean_abs for f in floor], ".3f")]]
    for row in rows:
        if not row.exact:
            continue
        for scale in scales:
            plan = plan_of_row(patcher.clone(), row, scale)
            found = [evaluate_plan(plan, mixture, scale, sigmas, samples_per_class, seed, sampling.percent_to_sigma)
                     for seed in seeds]
            lines.append([row.label, f"{scale:g}", pm([f.distance for f in found], ".3f"),
                          pm([f.adherence for f in found], ".3f"), pm([f.mean_abs for f in found], ".3f")])
            if bar is not None:
                bar.update(1)
    return format_table(headers, lines)


@dataclass
class MetricsReport:
    text: str
    seconds: float
    measurements: Measurements


def metrics_report(runner: EmbeddedRunner, methods: Sequence[str] = ALL_METHODS,
                   scales: Sequence[float] = (1.0, 3.0, 5.0, 7.5), seeds: Sequence[int] = (0, 1, 2),
                   mixture: bool = True, equal_strength: bool = True, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> MetricsReport:
    start = time.perf_counter()
    rows = [parse_row(m) for m in methods]
    if equal_strength and not any(r.label == "CFG" for r in rows):
        rows.insert(0, parse_row("cfg"))
    cfg_row = next((r for r in rows if r.label == "CFG"), None)
    extra_cfg = sorted(set(CFG_CURVE_SCALES) - set(scales)) if equal_strength and cfg_row else []
    exact_rows = [r for r in rows if r.exact] if mixture else []
    total = len(rows) * len(scales) * len(seeds) + len(extra_cfg) * len(seeds) + len(exact_rows) * len(scales)
    prefetch = getattr(runner, "prefetch", None)
    if prefetch is not None:  # samples drawn on ComfyUI servers: every run queued at once, over all servers
        prefetch([(row, scale, seed) for row in rows for scale in scales for seed in seeds]
                 + [(cfg_row, scale, seed) for scale in extra_cfg for seed in seeds])
    bar = progress_bar(total, "metrics", progress)
    results = measure(runner, rows, scales, seeds, bar)
    if extra_cfg:
        measure(runner, [cfg_row], extra_cfg, seeds, bar, results)
    sections = [
        f"Embedded digits model{getattr(runner, 'where', '')}: {runner.samples_per_class} samples per digit × "
        f"{len(runner.digits)} digits per run, "
        f"{runner.steps} steps {runner.sampler}/{runner.scheduler}, seeds {', '.join(map(str, seeds))} "
        f"(mean ± standard deviation over seeds).",
        reference_table(runner, seeds),
        method_table(results, rows, scales),
    ]
    if equal_strength and cfg_row:
        sections.append("Equal effective strength: CFG at the cfg with the same mean classifier margin "
                        f"(CFG measured at cfg {', '.join(f'{s:g}' for s in sorted(set(scales) | set(extra_cfg)))}; "
                        "values between them interpolated).")
        sections.append(equal_strength_table(results, rows, scales))
    if exact_rows:
        sections.append("Exact Gaussian-mixture benchmark (per-digit diagonal Gaussians fitted to the training digits; "
                        "closed-form denoisers; the same sigmas; squared 2-Wasserstein distance of the samples to the "
                        "true class distribution, averaged over digits; 300 samples per digit).")
        sections.append(mixture_table(runner, exact_rows, scales, seeds, bar=bar))
    if bar is not None:
        bar.close()
    if results.failed:
        sections.append("Cells that no server could draw (left out of the tables above):\n"
                        + "\n".join(results.failed.values()))
    seconds = time.perf_counter() - start
    sections.append(f"Report took {seconds:.0f} s.")
    return MetricsReport("\n\n".join(sections), seconds, results)
