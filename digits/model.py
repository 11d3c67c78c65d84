"""The embedded digits model: a small class-conditional diffusion model built from ComfyUI's own classes.

* Network: ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`` (the SD1.5 UNet class) at
  8×8 pixels, 1 channel, with spatial transformers whose cross-attention reads a one-token context.
  Every UNet hook of the pack (PAG, SEG, TPG, skip-layer, S²-Guidance, NAG) therefore acts on it
  exactly as on SD1.5.
* Conditioning: a learned class-embedding table of 11 rows (digits 0–9 and the null class 10,
  trained with label dropout), one row per sample as the cross-attention context ``[B, 1, 64]``.
  The table lives in the weights file beside the UNet; CONDITIONING carries the row itself.
* Parameterisation: ε-prediction with ComfyUI's discrete SD schedule (1000 steps, linear β from
  0.00085 to 0.012), wrapped as ``comfy.model_base.BaseModel`` (``ModelType.EPS``), so the sigmas
  are SD1.5's (0.029 … 14.6) and every sampler and scheduler behaves as on SD1.5.
* Latent: 1 channel, scale 1: the latent *is* the 8×8 image in [-1, 1] (ink = +1). An
  EmptyLatentImage of 64×64 becomes 1×8×8 through ``comfy.sample.fix_empty_latent_channels``.

This module imports ``comfy``; it is used by the loader node, the training script and compare.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import torch
from safetensors.torch import load_file, save_file

NUM_DIGITS = 10
NULL_CLASS = NUM_DIGITS  # index of the "no class" row of the embedding table
CONTEXT_DIM = 64
IMAGE_SIZE = 8
EMPTY_LATENT_SIZE = IMAGE_SIZE * 8  # EmptyLatentImage width/height that gives an 8×8 latent

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_WEIGHTS = WEIGHTS_DIR / "digits_unet.safetensors"
# the same UNet trained 1/12 as long, with the main model's class embedding frozen: Autoguidance's weak model
WEAK_UNET_WEIGHTS = WEIGHTS_DIR / "digits_unet_weak.safetensors"
EMBEDDING_KEY = "class_embedding.weight"
UNET_PREFIX = "diffusion_model."

UNET_CONFIG = dict(
    image_size=IMAGE_SIZE, in_channels=1, out_channels=1, model_channels=32, num_res_blocks=[1, 1],
    channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
    context_dim=CONTEXT_DIM, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True,
    use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False, num_classes=None,
)


class DigitsLatentFormat(comfy.latent_formats.LatentFormat):
    """1 channel, scale 1: the latent is the image. Previews show ink black on white."""

    latent_channels = 1
    scale_factor = 1.0

    def __init__(self):
        self.latent_rgb_factors = [[-1.0, -1.0, -1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]


class DigitsConfig(comfy.supported_models_base.BASE):
    """Model config of the embedded digits model (ε-prediction, ComfyUI's discrete SD schedule)."""

    unet_config = dict(UNET_CONFIG)
    unet_extra_config = {}
    latent_format = DigitsLatentFormat
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.EPS

    def inpaint_model(self):
        return False


class DigitsWeightsError(RuntimeError):
    """The digits weights file is missing or does not fit the model; the message names the fix."""


@dataclass
class DigitsModel:
    """A loaded digits model: the ComfyUI MODEL and the class-embedding table."""

    patcher: comfy.model_patcher.ModelPatcher
    class_embedding: torch.Tensor  # [NUM_DIGITS + 1, CONTEXT_DIM]
    metadata: dict = field(default_factory=dict)

    def conditioning(self, digits) -> list:
        return class_conditioning(self.class_embedding, digits)

    def null_conditioning(self, batch: int = 1) -> list:
        return class_conditioning(self.class_embedding, [NULL_CLASS] * batch)


def build_base_model(device: torch.device | None = None) -> comfy.model_base.BaseModel:
    """A randomly initialised digits BaseModel (UNetModel inside), float32."""
    config = DigitsConfig(dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=device)
    reset_parameters_(model.diffusion_model)
    return model


def reset_parameters_(module: torch.nn.Module) -> None:
    """PyTorch's default initialisation, which ComfyUI's ops skip (checkpoints overwrite it); training needs it."""
    for sub in module.modules():
        for base in (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(sub, base):
                base.reset_parameters(sub)
                break


def new_class_embedding() -> torch.nn.Embedding:
    embedding = torch.nn.Embedding(NUM_DIGITS + 1, CONTEXT_DIM)
    torch.nn.init.normal_(embedding.weight, std=1.0)
    return embedding


def class_conditioning(class_embedding: torch.Tensor, digits) -> list:
    """ComfyUI CONDITIONING for one digit per sample: ``[[context [B, 1, CONTEXT_DIM], {}]]``."""
    if isinstance(digits, int):
        digits = [digits]
    index = torch.as_tensor(list(digits), dtype=torch.long)
    if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) > NULL_CLASS:
        raise ValueError(f"Guidance Kit digits: classes must be 0–9 (or {NULL_CLASS} for the null class), "
                         f"got {list(digits)}")
    context = class_embedding.detach().float().cpu()[index].unsqueeze(1)
    return [[context, {}]]


def save_weights(path: str | Path, model: comfy.model_base.BaseModel, class_embedding: torch.Tensor,
                 metadata: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {UNET_PREFIX + k: v.detach().float().cpu().contiguous()
               for k, v in model.diffusion_model.state_dict().items()}
    tensors[EMBEDDING_KEY] = class_embedding.detach().float().cpu().contiguous()
    info = {"format": "guidance-kit digits model", "unet_config": json.dumps(UNET_CONFIG),
            "parameterization": "eps, ComfyUI discrete SD schedule (linear beta 0.00085-0.012, 1000 steps)",
            "null_class": str(NULL_CLASS)}
    info.update({k: str(v) for k, v in metadata.items()})
    save_file(tensors, str(path), metadata=info)
    return path


def read_class_embedding(path: str | Path) -> torch.Tensor:
    """The class-embedding table of a digits weights file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DigitsWeightsError(f"Guidance Kit digits: no weights file at {path}")
    with safe_open(str(path), framework="pt") as f:
        if EMBEDDING_KEY not in f.keys():
            raise DigitsWeightsError(f"Guidance Kit digits: {path} has no '{EMBEDDING_KEY}'; it is not a digits "
                                     f"model file written by digits/train.py.")
        return f.get_tensor(EMBEDDING_KEY).float()


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_digits_model(path: str | Path = UNET_WEIGHTS, load_device: torch.device | None = None,
                      offload_device: torch.device | None = None) -> DigitsModel:
    """The trained digits model as a ComfyUI ModelPatcher plus its class-embedding table."""
    path = Path(path)
    if not path.is_file():
        raise DigitsWeightsError(
            f"Guidance Kit digits: weights not found at {path}. They ship with the pack; restore them with "
            f"'git checkout -- digits/weights' or train them with 'python -m digits.train' in the pack folder.")
    state = load_file(str(path))
    if EMBEDDING_KEY not in state:
        raise DigitsWeightsError(f"Guidance Kit digits: {path} has no '{EMBEDDING_KEY}'; it is not a digits model "
                                 f"file written by digits/train.py.")
    class_embedding = state.pop(EMBEDDING_KEY)
    unet_state = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    model = build_base_model()
    missing, unexpected = model.diffusion_model.load_state_dict(unet_state, strict=False)
    if missing or unexpected:
        raise DigitsWeightsError(
            f"Guidance Kit digits: {path} does not fit the digits UNet (missing {len(missing)} keys, e.g. "
            f"{missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]}). Retrain with digits/train.py.")
    model.eval()
    load_device = load_device or comfy.model_management.get_torch_device()
    offload_device = offload_device or comfy.model_management.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    return DigitsModel(patcher, class_embedding, read_metadata(path))


_CACHE: dict[tuple, DigitsModel] = {}


def cached_digits_model(path: str | Path = UNET_WEIGHTS) -> DigitsModel:
    """One loaded model per weights file (and modification time); callers get a clone of the patcher."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else 0)
    if key not in _CACHE:
        for stale in [k for k in _CACHE if k[0] == key[0]]:  # an older version of the same file
            del _CACHE[stale]
        _CACHE[key] = load_digits_model(path)
    loaded = _CACHE[key]
    return DigitsModel(loaded.patcher.clone(), loaded.class_embedding, loaded.metadata)
