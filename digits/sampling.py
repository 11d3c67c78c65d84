"""Sample the digits model through ComfyUI's KSampler path, and turn 8×8 latents into pictures.

``sample`` does what ComfyUI's KSampler node does (``nodes.common_ksampler``): an empty latent
fixed to the model's channels, ``comfy.sample.prepare_noise`` from the seed, ``comfy.sample.sample``
with positive/negative CONDITIONING and the sampler's cfg. One batch holds one sample per requested
class; the batch layout fixes the noise, so the same seed gives the same noise under every method.
"""

from __future__ import annotations

import comfy.sample
import comfy.utils
import torch

from .model import EMPTY_LATENT_SIZE, IMAGE_SIZE, DigitsModel


def empty_latent(patcher, batch: int) -> torch.Tensor:
    """EmptyLatentImage(64×64) as ComfyUI creates it (4 channels), then fixed to the model's 1 channel."""
    latent = torch.zeros([batch, 4, EMPTY_LATENT_SIZE // 8, EMPTY_LATENT_SIZE // 8])
    return comfy.sample.fix_empty_latent_channels(patcher, latent)


def sample(patcher, digits_model: DigitsModel, classes: list[int], seed: int, cfg: float, steps: int = 20,
           sampler_name: str = "euler", scheduler: str = "normal", negative_class: int | None = None,
           progress: bool = False, sampler=None) -> torch.Tensor:
    """Samples [B, 1, 8, 8] (model space, ink = +1) for ``classes`` with ``patcher`` (possibly patched).

    ``sampler``: a SAMPLER object (e.g. from a sampler node) used as SamplerCustom uses it, with the
    ``scheduler``'s sigmas (BasicScheduler); None samples with ``sampler_name`` as KSampler does.
    """
    latent = empty_latent(patcher, len(classes))
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = digits_model.conditioning(classes)
    negative = (digits_model.null_conditioning(len(classes)) if negative_class is None
                else digits_model.conditioning([negative_class] * len(classes)))
    previous = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.PROGRESS_BAR_ENABLED = progress
    try:
        if sampler is None:
            out = comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                      latent, disable_pbar=not progress, seed=seed)
        else:
            out = comfy.sample.sample_custom(patcher, noise, cfg, sampler, custom_sigmas(patcher, scheduler, steps),
                                             positive, negative, latent, disable_pbar=not progress, seed=seed)
    finally:
        comfy.utils.PROGRESS_BAR_ENABLED = previous
    return out.float().cpu()


def custom_sigmas(patcher, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas ComfyUI's BasicScheduler node gives (denoise 1)."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps).cpu()


def latents_to_images(latents: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """8×8 latents [B, 1, 8, 8] → ComfyUI IMAGE [B, 8·scale, 8·scale, 3] in [0, 1], ink black on white.

    Values beyond [-1, 1] are clipped (``metrics.saturation`` counts them); nearest upscaling keeps
    the pixels visible.
    """
    if latents.ndim != 4 or latents.shape[1] != 1 or tuple(latents.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"Guidance Kit digits: expected digits latents [batch, 1, {IMAGE_SIZE}, {IMAGE_SIZE}], "
                         f"got {tuple(latents.shape)}")
    paper = ((1.0 - latents.float().clamp(-1.0, 1.0)) / 2.0)
    if scale > 1:
        paper = torch.nn.functional.interpolate(paper, scale_factor=scale, mode="nearest")
    return paper.movedim(1, -1).expand(-1, -1, -1, 3).contiguous()
