"""Train the embedded digits diffusion model (``digits/model.py``) on scikit-learn's 8×8 digits.

    python -m digits.train                     # in the pack folder: the shipped weights (~10 min, 1 CPU thread)
    python -m digits.train --steps 50 --out /tmp/digits_unet.safetensors   # a quick run
    python -m digits.train --steps 200 --class-embedding digits/weights/digits_unet.safetensors \
        --out digits/weights/digits_unet_weak.safetensors   # the shipped weak model (for Autoguidance)

A weak model for Autoguidance must read the same CONDITIONING as the main one: ``--class-embedding``
starts from the main model's class-embedding table and keeps it frozen (only the UNet trains).

ε-prediction loss through ComfyUI's own ``BaseModel.apply_model`` (input scaling, timestep mapping
and the denoised formula are the ones used at sampling time), σ drawn from the model's 1000
discrete SD sigmas, classes dropped to the null class with probability ``--label-dropout`` (for
CFG), AdamW with warm-up and cosine decay, and an exponential moving average of the weights, which
is what gets saved. Fixed seed and one CPU thread by default: the same command gives the same file.
The held-out split (``digits/data.py``) is never seen.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .comfy_setup import ComfyUINotFound, import_comfyui
from .data import load_split


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2400
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    label_dropout: float = 0.15
    ema_decay: float = 0.999
    seed: int = 0
    class_embedding_from: str = ""  # a digits weights file whose class-embedding table is used, frozen


@dataclass(frozen=True)
class TrainResult:
    path: Path
    seconds: float
    final_loss: float
    steps: int


def learning_rate_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(config: TrainConfig, out: str | Path, progress: bool = True) -> TrainResult:
    """Train from scratch and save the EMA weights to ``out`` (ComfyUI must be importable)."""
    from . import model as digits_model

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    data = load_split()
    images, labels = data.train_images, data.train_labels

    model = digits_model.build_base_model()
    embedding = digits_model.new_class_embedding()
    if config.class_embedding_from:
        with torch.no_grad():
            embedding.weight.copy_(digits_model.read_class_embedding(config.class_embedding_from))
        embedding.requires_grad_(False)
    model.train()
    parameters = list(model.diffusion_model.parameters()) + [p for p in embedding.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    ema_unet = copy.deepcopy(model.diffusion_model).requires_grad_(False)
    ema_embedding = embedding.weight.detach().clone()
    sigmas = model.model_sampling.sigmas.float()

    bar = _progress_bar(config.steps, progress)
    start = time.perf_counter()
    running = None
    for step in range(config.steps):
        index = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
        x0, classes = images[index], labels[index].clone()
        dropped = torch.rand(config.batch_size, generator=generator) < config.label_dropout
        classes[dropped] = digits_model.NULL_CLASS
        sigma = sigmas[torch.randint(0, sigmas.shape[0], (config.batch_size,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        noisy = x0 + sigma.view(-1, 1, 1, 1) * noise
        denoised = model.apply_model(noisy, sigma, c_crossattn=embedding(classes).unsqueeze(1))
        predicted_noise = (noisy - denoised) / sigma.view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(predicted_noise, noise)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(ema_unet.parameters(), model.diffusion_model.parameters()):
                ema_p.lerp_(p, 1 - decay)
            ema_embedding.lerp_(embedding.weight, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start

    model.diffusion_model = ema_unet
    metadata = {f"train_{k}": v for k, v in asdict(config).items()}
    metadata.update(train_seconds=f"{seconds:.0f}", train_final_loss=f"{running:.5f}",
                    train_threads=torch.get_num_threads(), train_images=images.shape[0],
                    torch_version=torch.__version__)
    path = digits_model.save_weights(out, model, ema_embedding, metadata)
    return TrainResult(path, seconds, float(running), config.steps)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="training digits UNet", unit="step", mininterval=2.0)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m digits.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"optimizer steps (default {defaults.steps})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--label-dropout", type=float, default=defaults.label_dropout,
                        help="probability of training a sample with the null class (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--class-embedding", default="",
                        help="use (frozen) the class-embedding table of this digits weights file, so the new model "
                             "reads the same CONDITIONING (a weak model for Autoguidance)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible)")
    parser.add_argument("--out", default=None,
                        help="output safetensors (default digits/weights/digits_unet.safetensors)")
    parser.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: COMFYUI_PATH, the ComfyUI this "
                                                        "pack is in, or ~/ComfyUI)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.steps < 1:
        print("python -m digits.train: --steps must be at least 1", file=sys.stderr)
        return 2
    try:
        import_comfyui(args.comfyui, cpu=True)
    except ComfyUINotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .model import UNET_WEIGHTS

    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         label_dropout=args.label_dropout, seed=args.seed, class_embedding_from=args.class_embedding,
                         warmup_steps=min(TrainConfig.warmup_steps, max(1, args.steps // 10)))
    result = train(config, args.out or UNET_WEIGHTS, progress=not args.no_progress)
    print(f"saved {result.path} ({result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
