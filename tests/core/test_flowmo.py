"""FlowMo's loss and latent update (guiders/flowmo.py) in plain torch: the loss against a loop reference, per-sample
independence in a batch, dtypes, the refusal of image latents, a gradient under torch.inference_mode with
inference-mode weights (as ComfyUI loads them), and the Adam update."""

import pytest
import torch

from guidance_kit.guiders.flowmo import flowmo_update, loss_gradient, motion_loss, motion_variance


def reference_loss(x0: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x0.shape
    losses = []
    for s in range(b):
        per_position = torch.zeros(h, w, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                total = 0.0
                for k in range(c):
                    series = [abs(float(x0[s, k, f + 1, i, j]) - float(x0[s, k, f, i, j])) for f in range(t - 1)]
                    mean = sum(series) / len(series)
                    total += sum((v - mean) ** 2 for v in series) / len(series)
                per_position[i, j] = total / c
        losses.append(per_position.max())
    return torch.stack(losses)


def test_loss_matches_the_loop_reference():
    x0 = torch.randn(2, 3, 5, 4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(motion_loss(x0).double(), reference_loss(x0), rtol=1e-5, atol=1e-7)


def test_constant_motion_has_zero_loss():
    frames = torch.arange(5.0).view(1, 1, 5, 1, 1) * torch.randn(1, 2, 1, 3, 3)  # linear in time: equal differences
    assert float(motion_loss(frames).abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_give_finite_float_losses(dtype):
    x0 = torch.randn(2, 4, 4, 3, 3).to(dtype)
    loss = motion_loss(x0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_image_latents_are_refused():
    with pytest.raises(ValueError, match="FlowMo: the motion loss needs a video latent"):
        motion_variance(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="at least 3 frames"):
        motion_variance(torch.randn(1, 4, 2, 8, 8))


def tiny_predictor(seed: int = 0):
    with torch.inference_mode():  # ComfyUI builds and loads its models under inference mode
        layer = torch.nn.Conv3d(2, 2, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return lambda x: x - torch.tanh(layer(x))


def test_gradient_through_inference_mode_weights_matches_autograd_on_normal_weights():
    predict = tiny_predictor()
    with torch.inference_mode():
        x = torch.randn(2, 2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
        gradient, losses = loss_gradient(x, predict)
    reference_x = x.clone().requires_grad_(True)
    with torch.inference_mode(False):
        weights = [p.clone() for p in (predict.__closure__[0].cell_contents.weight,
                                       predict.__closure__[0].cell_contents.bias)]
        out = reference_x - torch.tanh(torch.nn.functional.conv3d(reference_x, *weights, padding=1))
        motion_loss(out).sum().backward()
    assert torch.allclose(gradient, reference_x.grad, atol=1e-6)
    assert losses.shape == (2,)


def test_batch_update_equals_per_sample_updates():
    predict = tiny_predictor()
    x = torch.randn(3, 2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    batched, _ = flowmo_update(x, predict, 3, 0.01)
    apart = torch.cat([flowmo_update(x[i:i + 1], predict, 3, 0.01)[0] for i in range(3)])
    assert torch.allclose(batched, apart, atol=1e-6)


def test_first_adam_step_moves_by_the_learning_rate_and_lowers_the_loss():
    predict = tiny_predictor()
    x = torch.randn(1, 2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    moved, losses = flowmo_update(x, predict, 1, 0.005)
    gradient, _ = loss_gradient(x, predict)
    step = (x - moved)[gradient.abs() > 1e-6]
    assert torch.allclose(step.abs(), torch.full_like(step, 0.005), rtol=1e-3)
    with torch.inference_mode():
        assert float(motion_loss(predict(moved))) < float(losses[0])
    assert torch.equal(flowmo_update(x, predict, 0, 0.005)[0], x)
