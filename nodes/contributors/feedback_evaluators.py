"""The evaluators of Online Feedback CFG (``guiders/methods/online_feedback_cfg.py``): the embedded digit classifier
and a CLIP vision model with the VAE, as ComfyUI loads them. Immutable once built (a plan copy shares them)."""

from __future__ import annotations

import torch

from ...guiders.methods.online_feedback_cfg import CandidateEvaluator

CLASSIFIER_MODES = ("adherence", "confidence")


class EvaluatorError(ValueError):
    """An evaluator that cannot score this model's candidates; the message names the fix."""


class DigitClassifierEvaluator(CandidateEvaluator):
    """The pack's digit classifier on the candidate x0 (the digits model's latent is the 8×8 image in [-1, 1]).

    ``adherence``: log p(c | x0) of the row's class; ``confidence``: −entropy of p(· | x0) (no class needed)."""

    def __init__(self, classifier: torch.nn.Module, class_table: torch.Tensor, mode: str = "adherence"):
        if mode not in CLASSIFIER_MODES:
            raise EvaluatorError(f"digit classifier mode must be one of {CLASSIFIER_MODES}, got {mode!r}")
        self.classifier = classifier.eval()
        self.class_table = class_table
        self.mode = mode
        self.name = f"digit classifier ({mode})"

    def needs(self) -> frozenset[str]:
        return frozenset({"classes"}) if self.mode == "adherence" else frozenset()

    def score(self, candidates: torch.Tensor, context: dict) -> torch.Tensor:
        k, b = candidates.shape[:2]
        images = candidates.reshape((k * b,) + tuple(candidates.shape[2:]))
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise EvaluatorError(f"the digit classifier reads 8×8 digits latents [B, 1, 8, 8], got "
                                 f"{tuple(candidates.shape[2:])}")
        with torch.no_grad():
            device = next(self.classifier.parameters()).device
            log_p = torch.log_softmax(self.classifier(images.float().to(device)).float().cpu(), dim=-1)
        log_p = log_p.reshape(k, b, -1)
        if self.mode == "confidence":
            return (log_p.exp() * log_p).sum(-1)
        classes = torch.as_tensor(context["classes"], dtype=torch.long).reshape(1, b, 1).expand(k, b, 1)
        return log_p.gather(-1, classes).squeeze(-1)


def downscale_latent(latent: torch.Tensor, preview: int) -> torch.Tensor:
    """Area-downscale an image latent so that its longer side is at most ``preview`` latent pixels."""
    height, width = latent.shape[-2:]
    factor = max(height, width) / preview
    if factor <= 1:
        return latent
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    return torch.nn.functional.interpolate(latent, size=size, mode="area")


class ClipVisionEvaluator(CandidateEvaluator):
    """Cosine similarity of a decoded preview of each candidate (VAE, then CLIP vision's projected image embedding)
    to the prompt's pooled CLIP text embedding."""

    name = "CLIP vision + VAE"

    def __init__(self, clip_vision, vae, latent_format, preview: int = 32):
        self.clip_vision, self.vae, self.latent_format, self.preview = clip_vision, vae, latent_format, int(preview)

    def needs(self) -> frozenset[str]:
        return frozenset({"text_embedding"})

    def score(self, candidates: torch.Tensor, context: dict) -> torch.Tensor:
        k, b = candidates.shape[:2]
        latents = candidates.reshape((k * b,) + tuple(candidates.shape[2:]))
        if latents.ndim != 4:
            raise EvaluatorError(f"the CLIP evaluator scores image latents [B, C, H, W]; got a {latents.ndim}-D latent "
                                 f"(video models are not supported)")
        latents = downscale_latent(self.latent_format.process_out(latents.float()), self.preview)
        with torch.no_grad():
            images = self.vae.decode(latents)
            if images.ndim == 5:  # some VAEs return [B, T, H, W, C]
                images = images[:, 0]
            embeds = self.clip_vision.encode_image(images.float().clamp(0, 1))["image_embeds"].float().cpu()
        text = torch.as_tensor(context["text_embedding"]).float().cpu()
        if text.shape[-1] != embeds.shape[-1]:
            raise EvaluatorError(f"the CLIP vision model's image embedding has {embeds.shape[-1]} values but the "
                                 f"prompt's pooled text embedding has {text.shape[-1]}; use the CLIP vision model of "
                                 f"the text encoder that encoded the prompt (SD1.5: ViT-L/14, SDXL: ViT-bigG/14)")
        text = text.reshape(1, b, -1).expand(k, b, -1).reshape(k * b, -1)
        return torch.nn.functional.cosine_similarity(embeds, text, dim=-1).reshape(k, b)
