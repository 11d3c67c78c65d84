"""CFG Decomposition · the linear decomposition of the CFG direction (stage 2, a weight factor that re-weights
the direction's components).

Paper: Li, Wang, Qu, "Towards Understanding the Mechanisms of Classifier-Free Guidance", arXiv 2505.19210
(§3, linear diffusion models). For Gaussian data, class c with x0 ~ N(μ_c, Σ_c) and the unconditional data
approximated by N(μ_u, Σ_u), noised as ComfyUI samples ε-models (x = x0 + σ·n, the paper's EDM convention),
the optimal *linear* denoisers are

    D_c(x) = μ_c + W_c·(x − μ_c),   W_c = Σ_c(Σ_c + σ²I)⁻¹      (and D_u with μ_u, Σ_u)

and the CFG direction splits exactly into

    D_c − D_u = m + P·x + N·x
    m   = (I − W_c)·μ_c − (I − W_u)·μ_u                           mean shift (→ μ_c − μ_u at high σ)
    W_c − W_u = Σ_k η_k q_k q_kᵀ                                    (symmetric: W_c and W_u are functions of
    P   = Σ_{η_k > 0} η_k q_k q_kᵀ                                   symmetric matrices of the same σ)
    N   = Σ_{η_k < 0} η_k q_k q_kᵀ

P·x (positive contrastive principal components: directions more spread in class c than in the data) boosts
class-specific features, N·x (negative CPC) suppresses generic ones. Grouping every x-independent part into
"mean shift" is the pack's reading (see the help page). A real model's direction g = C − U is not linear: the
pack keeps the rest r = g − (m + P·x + N·x) at weight 1, so the guided prediction is

    D̂ = U + W·(s_m·m + s_+·P·x + s_−·N·x + r)

which is CFG exactly at s_m = s_+ = s_− = 1 (the other weight factors and the schedule act on W as usual). The
weights act inside a progress window only (default the first 40 % of the run): at low noise the linear terms are
large and cancel each other (the paper's §4: linear and nonlinear CFG diverge there), so re-weighting them there
destroys the sample; outside the window the direction is CFG's and the components are still measured.
The statistics are per class (means, covariances) plus the unconditional ones, in a safetensors file
(``digits/linear_statistics.py`` writes the digits model's, estimated from its own samples); the class of each
row comes from ``classes`` or from the run state (the node's reader resolves it from the conditioning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..plan import PlanError, WeightFactor

if TYPE_CHECKING:
    from ..step import DirectionInputs, GuidanceState

CLASSES_KEY = "cfg_decomposition/classes"  # method_state: LongTensor [B], the class of each row (the node's reader)
NORMS_KEY = "cfg_decomposition/norms"  # method_state: list of per-step component norms (the analysis output)
STATISTICS_KEY = "cfg_decomposition/statistics"  # method_state: the loaded LinearStatistics of this run
COMPONENTS = ("mean_shift", "positive_cpc", "negative_cpc", "residual")


class StatisticsError(ValueError):
    """Statistics that cannot be used (missing file, wrong shape, a row whose class is unknown)."""


@dataclass(frozen=True)
class LinearStatistics:
    """Gaussian statistics of the data per class and unconditionally (float64, flattened samples of D values)."""

    class_means: torch.Tensor  # [K, D]
    class_covariances: torch.Tensor  # [K, D, D]
    uncond_mean: torch.Tensor  # [D]
    uncond_covariance: torch.Tensor  # [D, D]
    class_embedding: torch.Tensor | None = None  # [K + 1, E]: the model's conditioning rows (identify a row's class)

    @property
    def dims(self) -> int:
        return int(self.class_means.shape[1])

    @property
    def classes(self) -> int:
        return int(self.class_means.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"class_means": self.class_means, "class_covariances": self.class_covariances,
               "uncond_mean": self.uncond_mean, "uncond_covariance": self.uncond_covariance}
        if self.class_embedding is not None:
            out["class_embedding"] = self.class_embedding
        return {k: v.detach().double().cpu().contiguous() for k, v in out.items()}

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"format": "guidance-kit linear statistics"}
        info.update({k: str(v) for k, v in (metadata or {}).items()})
        save_file(self.tensors(), str(path), metadata=info)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearStatistics:
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise StatisticsError(f"no linear statistics file at {path}")
        state = load_file(str(path))
        missing = [k for k in ("class_means", "class_covariances", "uncond_mean", "uncond_covariance")
                   if k not in state]
        if missing:
            raise StatisticsError(f"{path} is not a linear statistics file (missing {', '.join(missing)})")
        stats = cls(state["class_means"].double(), state["class_covariances"].double(), state["uncond_mean"].double(),
                    state["uncond_covariance"].double(),
                    state["class_embedding"].double() if "class_embedding" in state else None)
        k, d = stats.class_means.shape
        if stats.class_covariances.shape != (k, d, d) or stats.uncond_covariance.shape != (d, d) or \
                stats.uncond_mean.shape != (d,):
            raise StatisticsError(f"{path}: inconsistent shapes (means {tuple(stats.class_means.shape)}, covariances "
                                  f"{tuple(stats.class_covariances.shape)})")
        return stats

    @classmethod
    def from_samples(cls, samples: torch.Tensor, labels: torch.Tensor, uncond_samples: torch.Tensor,
                     shrinkage: float = 1e-4, class_embedding: torch.Tensor | None = None) -> LinearStatistics:
        """Means and covariances (unbiased, plus ``shrinkage``·I) of samples per class and of ``uncond_samples``."""
        flat = samples.double().flatten(1)
        classes = labels.unique(sorted=True)
        if not torch.equal(classes, torch.arange(classes.numel())):
            raise StatisticsError("labels must be 0…K−1 with every class present")
        means = torch.stack([flat[labels == c].mean(0) for c in classes])
        covs = torch.stack([_covariance(flat[labels == c], shrinkage) for c in classes])
        uncond = uncond_samples.double().flatten(1)
        return cls(means, covs, uncond.mean(0), _covariance(uncond, shrinkage), class_embedding)


def _covariance(rows: torch.Tensor, shrinkage: float) -> torch.Tensor:
    centred = rows - rows.mean(0, keepdim=True)
    cov = centred.T @ centred / max(1, rows.shape[0] - 1)
    return cov + shrinkage * torch.eye(cov.shape[0], dtype=cov.dtype)


def linear_gain(covariance: torch.Tensor, sigma: float) -> torch.Tensor:
    """W = Σ(Σ + σ²I)⁻¹ (symmetric: computed through Σ's eigenvectors), float64."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    eigenvalues = eigenvalues.clamp_min(0.0)
    return (eigenvectors * (eigenvalues / (eigenvalues + sigma ** 2))) @ eigenvectors.T


def linear_denoiser(x: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor, sigma: float) -> torch.Tensor:
    """μ + W·(x − μ) for rows x [B, D] (float64)."""
    gain = linear_gain(covariance, sigma)
    return mean + (x.double() - mean) @ gain.T


def decompose(x: torch.Tensor, sigma: float, labels: torch.Tensor,
              stats: LinearStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean shift m, positive CPC P·x, negative CPC N·x) of D_c − D_u for each row of x (any shape [B, ...] with
    D values per sample), float64 in x's shape; m + P·x + N·x is exactly D_c(x) − D_u(x) of the linear denoisers."""
    rows = x.double().reshape(x.shape[0], -1)
    if rows.shape[1] != stats.dims:
        raise StatisticsError(f"the statistics describe samples of {stats.dims} values, the latent has "
                              f"{rows.shape[1]} per sample ({tuple(x.shape[1:])})")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if labels.numel() != rows.shape[0]:
        raise StatisticsError(f"{labels.numel()} class labels for a batch of {rows.shape[0]}")
    if int(labels.min()) < 0 or int(labels.max()) >= stats.classes:
        raise StatisticsError(f"class labels must be 0…{stats.classes - 1}, got {labels.tolist()}")
    rows = rows.cpu()
    eye = torch.eye(stats.dims, dtype=torch.float64)
    gain_u = linear_gain(stats.uncond_covariance, sigma)
    shift_u = (eye - gain_u) @ stats.uncond_mean
    mean_shift = torch.empty_like(rows)
    positive = torch.empty_like(rows)
    negative = torch.empty_like(rows)
    for c in labels.unique().tolist():
        selected = labels == c
        gain_c = linear_gain(stats.class_covariances[c], sigma)
        contrast = gain_c - gain_u
        eta, q = torch.linalg.eigh(0.5 * (contrast + contrast.T))
        projected = rows[selected] @ q  # coordinates in the contrastive principal components
        positive[selected] = (projected * eta.clamp_min(0.0)) @ q.T
        negative[selected] = (projected * eta.clamp_max(0.0)) @ q.T
        mean_shift[selected] = ((eye - gain_c) @ stats.class_means[c] - shift_u).expand(int(selected.sum()), -1)
    shape, device = x.shape, x.device
    return tuple(t.reshape(shape).to(device) for t in (mean_shift, positive, negative))


def reweighted_direction(direction: torch.Tensor, x: torch.Tensor, sigma: float, labels: torch.Tensor,
                         stats: LinearStatistics, scales: tuple[float, float, float]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """g' = s_m·m + s_+·P·x + s_−·N·x + r with r = g − (m + P·x + N·x) (float32), and each component [B, ...]."""
    mean_shift, positive, negative = decompose(x, sigma, labels, stats)
    residual = direction.double() - (mean_shift + positive + negative)
    s_mean, s_pos, s_neg = scales
    guided = s_mean * mean_shift + s_pos * positive + s_neg * negative + residual
    return guided.to(direction.dtype), dict(zip(COMPONENTS, (mean_shift, positive, negative, residual)))


def per_sample_norms(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(t.shape[0], -1).norm(dim=1)


@dataclass(frozen=True)
class CFGDecomposition(WeightFactor):
    """Separate weights for the mean shift and the positive/negative CPC terms of the CFG direction.

    ``statistics``: a linear-statistics safetensors file; ``classes``: each row's class (row i → classes[i % n]);
    empty: read from the run state (``CLASSES_KEY``, set by the node's conditioning reader)."""

    KEY = "cfg_decomposition"
    ORDER = 90  # after β-CFG and S-CFG, which read the unmodified direction

    statistics: str = ""
    mean_shift_scale: float = 1.0
    positive_scale: float = 1.0
    negative_scale: float = 1.0
    classes: tuple[int, ...] = ()
    label: str = "CFG Decomposition"
    start_percent: float = 0.0
    end_percent: float = 0.4  # the linear model holds at high and moderate noise only (the paper's §4)

    def validate(self) -> None:
        if not self.statistics:
            raise PlanError(f"{self.label}: no statistics file (the class means and covariances it needs)")
        if any(c < 0 for c in self.classes):
            raise PlanError(f"{self.label}: classes must be ≥ 0, got {self.classes}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise PlanError(f"{self.label}: the re-weighting window needs 0 ≤ start_percent ≤ end_percent ≤ 1 (got "
                            f"{self.start_percent}, {self.end_percent})")

    def reweights_at(self, progress: float) -> bool:
        return self.start_percent <= progress <= self.end_percent + 1e-9

    @property
    def scales(self) -> tuple[float, float, float]:
        return (self.mean_shift_scale, self.positive_scale, self.negative_scale)

    def load_statistics(self, state: GuidanceState) -> LinearStatistics:
        cached = state.method_state.get(STATISTICS_KEY)
        if cached is None or cached[0] != self.statistics:
            try:
                cached = (self.statistics, LinearStatistics.load(self.statistics))
            except StatisticsError as e:
                raise PlanError(f"{self.label}: {e}") from None
            state.method_state[STATISTICS_KEY] = cached
        return cached[1]

    def labels(self, batch: int, state: GuidanceState) -> torch.Tensor:
        if self.classes:
            return torch.tensor([self.classes[i % len(self.classes)] for i in range(batch)], dtype=torch.long)
        found = state.method_state.get(CLASSES_KEY)
        if found is None:
            raise PlanError(f"{self.label}: the class of each row is unknown in this step (the conditioning was not "
                            f"read). Sample the model the node patched, with the Digits Model Loader's positive "
                            f"conditioning.")
        found = torch.as_tensor(found, dtype=torch.long).reshape(-1)
        if found.numel() != batch:
            raise PlanError(f"{self.label}: {found.numel()} class labels were read for a batch of {batch}")
        return found

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        if len(weights) > 1:
            raise PlanError(f"{self.label}: it re-weights the whole CFG direction and cannot follow a band split "
                            f"(FDG) in the same plan; remove one of the two nodes.")
        state = direction.state
        stats = self.load_statistics(state)
        step = direction.step
        labels = self.labels(step.x.shape[0], state)
        try:
            scales = self.scales if self.reweights_at(step.position.progress) else (1.0, 1.0, 1.0)
            guided, parts = reweighted_direction(direction.difference, step.x, step.sigma_value, labels, stats,
                                                 scales)
        except StatisticsError as e:
            raise PlanError(f"{self.label}: {e}. Its statistics exist for the embedded digits model only.") from None
        if scales != (1.0, 1.0, 1.0):
            direction.difference = guided.to(direction.difference.dtype)
        record = {"sigma": step.sigma_value, "direction": float(per_sample_norms(direction.difference).mean())}
        record.update({name: float(per_sample_norms(t).mean()) for name, t in parts.items()})
        state.method_state.setdefault(NORMS_KEY, []).append(record)
        return weights

    def run_report(self, state: GuidanceState) -> str:
        norms = state.method_state.get(NORMS_KEY) or []
        if not norms:
            return ""
        mean = {name: sum(r[name] for r in norms) / len(norms) for name in COMPONENTS}
        return (f". {self.label}: mean norm over {len(norms)} evaluations: mean shift {mean['mean_shift']:.3g}, "
                f"positive CPC {mean['positive_cpc']:.3g}, negative CPC {mean['negative_cpc']:.3g}, "
                f"nonlinear rest {mean['residual']:.3g}")
