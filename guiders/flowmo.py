"""FlowMo (Shaulov et al., arXiv 2506.01144): training-free motion-coherence guidance for video latents.

At the guided steps the latent x_t is moved, before the step's own evaluation, down the gradient of a
motion-coherence loss of the model's predicted clean video x̂0(x_t):

    Δ_f   = |x̂0[:, :, f+1] − x̂0[:, :, f]|                 (appearance-debiased frame differences)
    V     = Var_f(Δ_f)  (biased), averaged over channels  (patch-wise temporal variance, one value per position)
    L     = max over latent positions of V                 (per sample)

and x_t ← Adam step(s) on L with learning rate ``learning_rate`` (a fresh Adam state at every guided step, as
the authors' ``MotionVarianceOptimizer`` creates one per call). The loss of a batch is the sum of the per-sample
losses, so each sample's update depends on its own prediction only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the authors use
ADAM_EPS = 1e-8


def motion_variance(x0: torch.Tensor) -> torch.Tensor:
    """Per-position temporal variance of the absolute frame differences of ``x0`` [B, C, T, H, W], averaged
    over channels: [B, H, W]."""
    if x0.ndim != 5 or x0.shape[2] < 3:
        raise ValueError("FlowMo: the motion loss needs a video latent [B, C, T, H, W] with at least 3 frames, got "
                         f"shape {tuple(x0.shape)}.")
    differences = (x0[:, :, 1:] - x0[:, :, :-1]).abs()
    return differences.float().var(dim=2, unbiased=False).mean(dim=1)


def motion_loss(x0: torch.Tensor) -> torch.Tensor:
    """The per-sample FlowMo loss [B]: the largest patch-wise temporal variance (``motion_variance``)."""
    return motion_variance(x0).flatten(1).amax(dim=1)


class _CloneInferenceTensors(TorchFunctionMode):
    """Every tensor created under ``torch.inference_mode`` (ComfyUI loads weights and runs samplers there)
    enters autograd as a normal clone: inference tensors cannot be saved for backward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def normal(value):
            return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value

        return func(*tree_map(normal, args), **tree_map(normal, kwargs or {}))


Predictor = Callable[[torch.Tensor], torch.Tensor]


def loss_gradient(x: torch.Tensor, predict_x0: Predictor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇_x Σ_b L_b(predict_x0(x)), the per-sample losses), differentiating through ``predict_x0`` even when
    called under ``torch.no_grad`` / ``torch.inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad(), _CloneInferenceTensors():
        variable = x.detach().clone().requires_grad_(True)
        losses = motion_loss(predict_x0(variable))
        (gradient,) = torch.autograd.grad(losses.sum(), variable)
    return gradient.detach(), losses.detach()


def flowmo_update(x: torch.Tensor, predict_x0: Predictor, iterations: int,
                  learning_rate: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``iterations`` Adam steps (fresh state) on the FlowMo loss; returns the moved latent and the losses seen
    before each step."""
    beta1, beta2 = ADAM_BETAS
    with torch.inference_mode(False):
        moved = x.detach().clone().float()
        first = torch.zeros_like(moved)
        second = torch.zeros_like(moved)
        losses = []
        for step in range(1, iterations + 1):
            gradient, loss = loss_gradient(moved.to(x.dtype), predict_x0)
            gradient = gradient.float()
            losses.append(loss)
            first = beta1 * first + (1 - beta1) * gradient
            second = beta2 * second + (1 - beta2) * gradient * gradient
            first_hat = first / (1 - beta1 ** step)
            second_hat = second / (1 - beta2 ** step)
            moved = moved - learning_rate * first_hat / (second_hat.sqrt() + ADAM_EPS)
    return moved.to(x.dtype), losses
