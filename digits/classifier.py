"""A small CNN digit classifier for the 8×8 digits (pure torch): adherence and Fréchet-distance features.

``features`` is the 32-dimensional penultimate layer (after ReLU), the space in which
``metrics.frechet_distance`` compares generated digits with held-out real ones, as FID does with
Inception features. Inputs are images in [-1, 1] (ink = +1), ``[B, 1, 8, 8]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CLASSIFIER_WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_classifier.safetensors"
FEATURE_DIM = 32


class DigitClassifierError(RuntimeError):
    """The classifier weights are missing or do not fit; the message names the fix."""


class DigitClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.dropout = torch.nn.Dropout(0.25)
        self.hidden = torch.nn.Linear(64 * 2 * 2, FEATURE_DIM)
        self.head = torch.nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [B, FEATURE_DIM]."""
        x = torch.relu(self.conv1(images))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv3(x)), 2)
        return torch.relu(self.hidden(self.dropout(x.flatten(1))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, 10], features [B, FEATURE_DIM]) in eval mode, on the classifier's device."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        logits, feats = [], []
        for chunk in images.float().split(batch):
            f = self.features(chunk.to(device))
            feats.append(f.cpu())
            logits.append(self.head(f).cpu())
        self.train(was_training)
        return torch.cat(logits), torch.cat(feats)


def save_classifier(classifier: DigitClassifier, path: str | Path, metadata: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})
    return path


def load_classifier(path: str | Path = CLASSIFIER_WEIGHTS) -> DigitClassifier:
    path = Path(path)
    if not path.is_file():
        raise DigitClassifierError(
            f"Guidance Kit digits: classifier weights not found at {path}. They ship with the pack; restore them "
            f"with 'git checkout -- digits/weights' or train them with 'python -m digits.train_classifier'.")
    classifier = DigitClassifier()
    try:
        classifier.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise DigitClassifierError(f"Guidance Kit digits: {path} does not fit the digit classifier ({e}); retrain "
                                   f"it with 'python -m digits.train_classifier'.") from None
    return classifier.eval()


def classifier_metadata(path: str | Path = CLASSIFIER_WEIGHTS) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
