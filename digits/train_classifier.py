"""Train the digit classifier used by the quality metrics (``digits/classifier.py``), pure torch.

    python -m digits.train_classifier            # in the pack folder: the shipped weights (~1 min, 1 thread)
    python -m digits.train_classifier --epochs 1 --out /tmp/classifier.safetensors

Trained on the training split only (``digits/data.py``) with random one-pixel shifts, so that it
still reads generated digits that sit slightly off-centre; the held-out accuracy is printed and
stored in the file's metadata.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .classifier import CLASSIFIER_WEIGHTS, DigitClassifier, save_classifier
from .data import load_split


@dataclass(frozen=True)
class ClassifierResult:
    path: Path
    test_accuracy: float
    seconds: float
    epochs: int


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels in x and y, background (-1) filled in."""
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets.tolist())])


def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits, _ = classifier.predict(images)
    return float((logits.argmax(1) == labels).float().mean())


def train_classifier(out: str | Path = CLASSIFIER_WEIGHTS, epochs: int = 40, batch_size: int = 64, seed: int = 0,
                     learning_rate: float = 2e-3) -> ClassifierResult:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = load_split()
    classifier = DigitClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-3)
    steps_per_epoch = (data.train_images.shape[0] + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate,
                                                   total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    classifier.train()
    for _ in range(epochs):
        order = torch.randperm(data.train_images.shape[0], generator=generator)
        for index in order.split(batch_size):
            images = random_shift(data.train_images[index], generator)
            loss = torch.nn.functional.cross_entropy(classifier(images), data.train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(classifier, data.test_images, data.test_labels)
    path = save_classifier(classifier, out, {
        "format": "guidance-kit digit classifier", "test_accuracy": f"{test_accuracy:.4f}",
        "test_images": data.test_images.shape[0], "epochs": epochs, "seed": seed,
        "train_seconds": f"{seconds:.0f}", "torch_version": torch.__version__})
    return ClassifierResult(path, test_accuracy, seconds, epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m digits.train_classifier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible)")
    parser.add_argument("--out", default=str(CLASSIFIER_WEIGHTS), help="output safetensors (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.epochs < 1:
        print("python -m digits.train_classifier: --epochs must be at least 1", file=sys.stderr)
        return 2
    result = train_classifier(args.out, epochs=args.epochs, seed=args.seed)
    print(f"saved {result.path}: held-out accuracy {result.test_accuracy:.2%} ({result.epochs} epochs, "
          f"{result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
