"""Quality metrics for generated digits (pure torch/numpy; no ComfyUI).

* **adherence** — fraction of samples the digit classifier reads as the requested class;
* **margin** — mean classifier logit of the requested class minus the largest other logit: how
  unambiguously a sample shows its class. Unlike adherence it keeps growing past 100%, so it is the
  guidance-strength measure of the equal-strength comparison;
* **Fréchet distance** — between Gaussians fitted to classifier features of generated digits and of
  held-out real digits (FID's formula in ``classifier.FEATURE_DIM`` dimensions): fidelity and
  diversity together, lower is better; it grows with fewer samples, so compare equal sample counts;
* **diversity** — mean pairwise L2 distance between samples of the same class (pixel space,
  averaged over classes): falls when guidance collapses the modes;
* **saturation** — fraction of pixels beyond [-1, 1] by more than half a grey level of the data
  (``CLIP_TOLERANCE``; the data's 17 levels are 0.125 apart, and its background sits exactly at -1,
  so a sampler's last-digit error alone would otherwise count), and the mean |pixel| (real digits:
  0 and about 0.75).

Generated digits are clipped to [-1, 1] before the classifier sees them, as the picture does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .classifier import CLASSIFIER_WEIGHTS, DigitClassifier, load_classifier

CLIP_TOLERANCE = 1.0 / 16.0  # half of one grey level (2/16 in [-1, 1] units)


def gaussian_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` [N, D] in float64."""
    x = np.asarray(torch.as_tensor(features).detach().cpu().double().numpy())
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Guidance Kit metrics: need at least 2 feature vectors [N, D], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_statistics(mu_a, cov_a, mu_b, cov_b) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½): the squared 2-Wasserstein distance of two Gaussians."""
    mu_a, mu_b = np.asarray(mu_a, dtype=np.float64), np.asarray(mu_b, dtype=np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, dtype=np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    root_a = _sqrt_psd(cov_a)
    cross = _sqrt_psd(root_a @ cov_b @ root_a)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(cross))
    return max(value, 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


def adherence(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose predicted class is the requested one."""
    return float((logits.argmax(dim=1) == labels.to(logits.device)).float().mean())


def classifier_margin(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of (logit of the requested class − largest other logit); negative for misread samples."""
    logits = logits.double()
    index = labels.reshape(-1, 1).to(logits.device)
    requested = logits.gather(1, index).squeeze(1)
    others = logits.scatter(1, index, float("-inf")).max(dim=1).values
    return float((requested - others).mean())


def mean_pairwise_distance(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean L2 distance between two different samples of the same class, averaged over the classes."""
    flat = images.detach().float().flatten(1)
    per_class = []
    for label in labels.unique():
        members = flat[labels == label]
        n = members.shape[0]
        if n < 2:
            continue
        distances = torch.cdist(members.double(), members.double())
        per_class.append(float(distances.sum() / (n * (n - 1))))
    if not per_class:
        raise ValueError("Guidance Kit metrics: diversity needs at least two samples of one class")
    return float(np.mean(per_class))


def saturation(images: torch.Tensor, tolerance: float = CLIP_TOLERANCE) -> tuple[float, float]:
    """(fraction of values beyond [-1, 1] by more than ``tolerance``, mean absolute value)."""
    x = images.detach().float()
    return float((x.abs() > 1.0 + tolerance).float().mean()), float(x.abs().mean())


@dataclass(frozen=True)
class SampleMetrics:
    """None where the sample set is too small (Fréchet: 2 samples; diversity: 2 of one class)."""

    adherence: float
    margin: float
    frechet: float | None
    diversity: float | None
    clipped: float
    mean_abs: float

    NAMES = ("adherence", "margin", "frechet", "diversity", "clipped", "mean_abs")

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.NAMES}


class DigitsEvaluator:
    """The metrics above against a fixed set of held-out real digits."""

    def __init__(self, real_images: torch.Tensor | None, classifier: DigitClassifier | None = None):
        """``real_images`` None: no Fréchet distance (e.g. scikit-learn, which ships the digits, is missing)."""
        self.classifier = classifier if classifier is not None else load_classifier(CLASSIFIER_WEIGHTS)
        self.real_images = real_images
        self.real_statistics = None
        if real_images is not None:
            _, real_features = self.classifier.predict(real_images)
            self.real_statistics = gaussian_statistics(real_features)

    def evaluate(self, samples: torch.Tensor, labels: torch.Tensor) -> SampleMetrics:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if samples.shape[0] != labels.shape[0]:
            raise ValueError(f"Guidance Kit metrics: {samples.shape[0]} samples but {labels.shape[0]} labels")
        logits, features = self.classifier.predict(samples.float().clamp(-1.0, 1.0))
        clipped, mean_abs = saturation(samples)
        enough_for_pairs = bool((labels.bincount() >= 2).any())
        return SampleMetrics(
            adherence=adherence(logits, labels),
            margin=classifier_margin(logits, labels),
            frechet=(frechet_distance_from_statistics(*gaussian_statistics(features), *self.real_statistics)
                     if samples.shape[0] >= 2 and self.real_statistics is not None else None),
            diversity=mean_pairwise_distance(samples, labels) if enough_for_pairs else None,
            clipped=clipped,
            mean_abs=mean_abs,
        )
