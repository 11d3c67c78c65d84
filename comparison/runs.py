"""Runs behind the grid cells: the embedded digits model, or a user's checkpoint, in this process.

Both sample through ComfyUI's own path (``comfy.sample.sample``, as the KSampler node) with the
methods applied by the pack's node classes (``methods.apply_row``). The server mode is in
``server.py``; the digits rows drawn on ComfyUI servers in ``remote_digits.py``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .grid import Cell, tile, to_pil
from .methods import Row, apply_row, row_sampler


class CompareError(RuntimeError):
    """A problem the user can fix (missing checkpoint, bad option); the message says how."""


class CellFailed(CompareError):
    """A cell no server could draw (the message has each server's error); reports show it as failed."""


@dataclass
class CellRun:
    cell: Cell
    metrics: dict[str, float]
    seconds: float


def format_caption(metrics: dict[str, float], keys: list[tuple[str, str, str]]) -> list[str]:
    """Caption lines from ``(key, short name, format)``, two values per line."""
    parts = [f"{short} {format(metrics[key], fmt)}" for key, short, fmt in keys if metrics.get(key) is not None]
    return ["  ".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]


DIGIT_CAPTION = [("adherence", "acc", ".2f"), ("frechet", "FD", ".1f"), ("diversity", "div", ".2f"),
                 ("clipped_percent", "clip%", ".1f")]
IMAGE_CAPTION = [("saturated_percent", "sat%", ".1f"), ("contrast", "std", ".3f"), ("brightness", "mean", ".2f")]


# ------------------------------------------------------------------------------------------------
# the embedded digits model
# ------------------------------------------------------------------------------------------------

def held_out_digits() -> torch.Tensor | None:
    """The held-out real digits, or None (with a note) when scikit-learn, which ships them, is missing."""
    from ..digits.data import DigitsDataError, load_split

    try:
        return load_split().test_images
    except DigitsDataError as e:
        print(f"note: no Fréchet distance: {e}", file=sys.stderr)
        return None


# the digit each digit is most often confused with: the negative prompt of the rows whose method takes one of its own
CONFUSED_WITH = {0: 6, 1: 7, 2: 7, 3: 8, 4: 9, 5: 6, 6: 0, 7: 1, 8: 3, 9: 4}


class EmbeddedRunner:
    """Samples of every requested digit per cell; the cell shows the first sample of each digit."""

    def __init__(self, steps: int = 20, sampler: str = "euler", scheduler: str = "normal", samples_per_class: int = 10,
                 digits: tuple[int, ...] = tuple(range(10)), upscale: int = 4, evaluator=None):
        from ..digits.metrics import DigitsEvaluator
        from ..digits.model import cached_digits_model

        if samples_per_class < 1:
            raise CompareError("compare: --samples must be at least 1")
        self.steps, self.sampler, self.scheduler = steps, sampler, scheduler
        self.samples_per_class, self.digits, self.upscale = samples_per_class, tuple(digits), upscale
        self.model = cached_digits_model()
        self._weak = None
        self.evaluator = evaluator if evaluator is not None else DigitsEvaluator(held_out_digits())

    def second_models(self, row: Row) -> dict:
        """Autoguidance's weak model (loaded on first use): the digits UNet trained 1/12 as long."""
        if not any(c.method.key == "autoguidance" for c in row.calls):
            return {}
        if self._weak is None:
            from ..digits.model import WEAK_UNET_WEIGHTS, DigitsWeightsError, load_digits_model

            try:
                self._weak = load_digits_model(WEAK_UNET_WEIGHTS)
            except DigitsWeightsError as e:
                raise CompareError(f"compare: {e}") from None
        return {"weak_model": self._weak.patcher.clone()}

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([d for _ in range(self.samples_per_class) for d in self.digits])

    def samples(self, row: Row, scale: float, seed: int) -> torch.Tensor:
        from ..digits import sampling

        negative = self.model.null_conditioning()
        if row.own_negative:  # Perp-Neg, DNG: the null class would be the uncond itself, i.e. no negative at all
            negative = self.model.conditioning([CONFUSED_WITH[d] for d in self.labels.tolist()])
        patched = apply_row(self.model.patcher.clone(), row, scale, negative=negative, seed=seed,
                            models=self.second_models(row))
        return sampling.sample(patched, self.model, self.labels.tolist(), seed, row.cfg_at(scale), self.steps,
                               self.sampler, self.scheduler, sampler=row_sampler(row, scale))

    def measure(self, samples: torch.Tensor) -> dict[str, float]:
        labels = self.labels
        values = self.evaluator.evaluate(samples, labels).as_dict()
        values["clipped_percent"] = 100.0 * values["clipped"]
        return values

    def run(self, row: Row, scale: float, seed: int) -> CellRun:
        start = time.perf_counter()
        samples = self.samples(row, scale, seed)
        return self.cell_run(samples, time.perf_counter() - start)

    def cell_run(self, samples: torch.Tensor, seconds: float) -> CellRun:
        """The grid cell of ``samples`` (the first sample of each digit) with its metrics."""
        from ..digits.sampling import latents_to_images

        metrics = self.measure(samples)
        shown = latents_to_images(samples[:len(self.digits)], self.upscale)
        picture = tile(list(shown), columns=min(5, len(self.digits)), gap=1)
        return CellRun(Cell(picture, format_caption(metrics, DIGIT_CAPTION)), metrics, seconds)


# ------------------------------------------------------------------------------------------------
# a user's checkpoint
# ------------------------------------------------------------------------------------------------

def image_statistics(images: torch.Tensor) -> dict[str, float]:
    """Pixel statistics of decoded images [B, H, W, 3] in [0, 1]: saturated channels, brightness, contrast."""
    x = images.detach().float().cpu()
    saturated = ((x <= 0.5 / 255) | (x >= 254.5 / 255)).float().mean()
    return {"saturated_percent": 100.0 * float(saturated), "brightness": float(x.mean()),
            "contrast": float(x.std())}


def load_extra_model_paths(comfyui: Path) -> None:
    """Honour ComfyUI's extra_model_paths.yaml, as main.py does."""
    config = comfyui / "extra_model_paths.yaml"
    if config.is_file():
        from utils.extra_config import load_extra_path_config

        load_extra_path_config(str(config))


def resolve_checkpoint(name: str) -> str:
    import folder_paths

    if Path(name).expanduser().is_file():
        return str(Path(name).expanduser())
    path = folder_paths.get_full_path("checkpoints", name)
    if path is not None:
        return path
    available = folder_paths.get_filename_list("checkpoints")
    folders = ", ".join(folder_paths.get_folder_paths("checkpoints"))
    listing = (", ".join(available[:20]) + (" ..." if len(available) > 20 else "")) if available else "none"
    raise CompareError(f"compare: checkpoint {name!r} not found in ComfyUI's checkpoint folders ({folders}). "
                       f"Available: {listing}. Put the file into one of those folders, or pass its path.")


class CheckpointRunner:
    """A checkpoint and a prompt, as Load Checkpoint → CLIP Text Encode → KSampler → VAE Decode do."""

    def __init__(self, checkpoint: str, prompt: str, negative: str = "", width: int = 512, height: int = 512,
                 steps: int = 20, sampler: str = "euler", scheduler: str = "normal", batch: int = 1,
                 comfyui: Path | None = None, upscale: int = 1):
        import comfy.sd
        import folder_paths

        if comfyui is not None:
            load_extra_model_paths(comfyui)
        path = resolve_checkpoint(checkpoint)
        try:
            loaded = comfy.sd.load_checkpoint_guess_config(
                path, output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))
        except RuntimeError as e:
            raise CompareError(f"compare: ComfyUI could not load {path}: {e}") from None
        self.model, clip, self.vae = loaded[0], loaded[1], loaded[2]
        if clip is None or self.vae is None:
            raise CompareError(f"compare: {Path(path).name} has no text encoder or no VAE inside; compare needs a "
                               f"full checkpoint (use the server mode with your own workflow for split files)")
        self.positive = self.encode(clip, prompt)
        self.negative = self.encode(clip, negative)
        self.width, self.height, self.batch = width, height, batch
        self.steps, self.sampler, self.scheduler = steps, sampler, scheduler

    @staticmethod
    def encode(clip, text: str):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    def run(self, row: Row, scale: float, seed: int) -> CellRun:
        import comfy.sample

        start = time.perf_counter()
        patched = apply_row(self.model, row, scale, negative=self.negative, seed=seed)
        latent = torch.zeros([self.batch, 4, self.height // 8, self.width // 8])
        latent = comfy.sample.fix_empty_latent_channels(patched, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        sampler = row_sampler(row, scale)
        if sampler is None:
            samples = comfy.sample.sample(patched, noise, self.steps, row.cfg_at(scale), self.sampler,
                                          self.scheduler, self.positive, self.negative, latent, seed=seed,
                                          disable_pbar=True)  # compare's own bar counts the cells
        else:
            from ..digits.sampling import custom_sigmas

            samples = comfy.sample.sample_custom(patched, noise, row.cfg_at(scale), sampler,
                                                 custom_sigmas(patched, self.scheduler, self.steps), self.positive,
                                                 self.negative, latent, seed=seed, disable_pbar=True)
        images = self.vae.decode(samples)
        if images.ndim == 5:  # video models: the first frame
            images = images[:, 0]
        seconds = time.perf_counter() - start
        metrics = image_statistics(images)
        picture = tile([to_pil(image) for image in images], columns=min(4, images.shape[0]))
        picture.thumbnail((256, 256))
        return CellRun(Cell(picture, format_caption(metrics, IMAGE_CAPTION)), metrics, seconds)


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
