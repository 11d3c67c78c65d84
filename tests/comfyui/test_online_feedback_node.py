"""Online Feedback CFG through ComfyUI's samplers: the digit classifier on the embedded digits model, and the CLIP
vision + VAE evaluator with tiny random-weight encoders built from ComfyUI's own classes (ClipVisionModel, TAESD)."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import json
import logging

import pytest
import torch

from guidance_kit.digits.sampling import sample
from guidance_kit.nodes.contributors.feedback_evaluators import ClipVisionEvaluator, downscale_latent
from guidance_kit.nodes.seed_papers import OnlineFeedbackCFGNode

from .harness import init_random_, ksample, out, tiny_model

PROJECTION = 16


@pytest.fixture(scope="module")
def tiny_clip_vision(tmp_path_factory):
    import comfy.clip_vision

    config = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
              "num_hidden_layers": 2, "patch_size": 8, "projection_dim": PROJECTION}
    path = tmp_path_factory.mktemp("clip_vision") / "tiny.json"
    path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    init_random_(clip_vision.model, seed=3)
    return clip_vision


@pytest.fixture(scope="module")
def tiny_vae():
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    init_random_(taesd, seed=4)
    return comfy.sd.VAE(sd=taesd.state_dict())


def feedback(model, **inputs):
    values = {"evaluator": "auto", "candidates": "1, 2, 4, 6", "start_percent": 0.0, "end_percent": 1.0,
              "budget": 0, "tolerance": 0.0}
    values.update(inputs)
    return out(OnlineFeedbackCFGNode.execute(model, **values))


def test_digit_classifier_chooses_per_sample_and_logs(loaded, caplog):
    model = feedback(loaded.patcher, budget=4)
    with caplog.at_level(logging.INFO, logger="guidance_kit"):
        chosen = sample(model, loaded, [1, 8], 0, 3.0, steps=8)
    report = next(r.getMessage() for r in caplog.records if "Online Feedback CFG:" in r.getMessage())
    assert "4 evaluated steps (digit classifier (adherence)" in report
    plain = sample(loaded.patcher, loaded, [1, 8], 0, 3.0, steps=8)
    assert float((chosen - plain).abs().max()) > 1e-3
    assert torch.equal(chosen, sample(model, loaded, [1, 8], 0, 3.0, steps=8))  # a run repeats exactly
    # one candidate equal to the sampler's cfg, all others far worse for the classifier is still a choice among
    # candidates: with a single sensible candidate list [3, 3] the run is CFG at 3
    same = sample(feedback(loaded.patcher, candidates="3, 3"), loaded, [1, 8], 0, 3.0, steps=8)
    assert torch.allclose(same, plain, atol=1e-5)


def test_batch_rows_are_independent(loaded):
    model = feedback(loaded.patcher, evaluator="digit classifier: confidence")
    batch = sample(model, loaded, [2, 6], 5, 3.0, steps=6)
    swapped = sample(model, loaded, [6, 2], 5, 3.0, steps=6)
    assert not torch.allclose(batch, swapped, atol=1e-3)  # each row follows its own class and noise


def test_clip_vision_evaluator_scores_decoded_previews(tiny_clip_vision, tiny_vae, caplog):
    base = tiny_model("sd15")
    model = feedback(base, clip_vision=tiny_clip_vision, vae=tiny_vae, preview_size=4, budget=2)
    g = torch.Generator().manual_seed(7)
    positive = [[torch.randn(1, 6, 64, generator=g), {"pooled_output": torch.randn(1, PROJECTION, generator=g)}]]
    negative = [[torch.randn(1, 6, 64, generator=g), {}]]
    with caplog.at_level(logging.INFO, logger="guidance_kit"):
        guided = ksample(model, "sd15", 4.0, steps=4, positive=positive, negative=negative, batch=2)
    assert bool(torch.isfinite(guided).all())
    assert any("2 evaluated steps (CLIP vision + VAE" in r.getMessage() for r in caplog.records)
    # the evaluator itself: [K, B] cosine similarities of the decoded previews to the text embedding
    evaluator = ClipVisionEvaluator(tiny_clip_vision, tiny_vae, base.model.latent_format, preview=4)
    candidates = torch.randn(3, 2, 4, 8, 8, generator=g)
    scores = evaluator.score(candidates, {"text_embedding": torch.randn(2, PROJECTION, generator=g)})
    assert scores.shape == (3, 2) and bool((scores.abs() <= 1.0 + 1e-5).all())
    assert downscale_latent(torch.ones(1, 4, 64, 32), 16).shape == (1, 4, 16, 8)
    # a prompt encoded without a pooled CLIP embedding is refused while sampling, naming the node
    with pytest.raises(Exception, match="Online Feedback CFG: the positive conditioning has no pooled CLIP"):
        ksample(model, "sd15", 4.0, steps=2, positive=negative, negative=negative)
    wrong = [[positive[0][0], {"pooled_output": torch.randn(1, PROJECTION + 1)}]]
    with pytest.raises(Exception, match="Online Feedback CFG: the CLIP vision model's image embedding has 16"):
        ksample(model, "sd15", 4.0, steps=2, positive=wrong, negative=negative)


def test_refusals_at_the_node(tiny_clip_vision):
    with pytest.raises(ValueError, match="Online Feedback CFG: the digit classifier scores the embedded digits"):
        feedback(tiny_model("sd15"))
    with pytest.raises(ValueError, match="needs both a CLIP_VISION model"):
        feedback(tiny_model("sd15"), evaluator="CLIP vision + VAE", clip_vision=tiny_clip_vision)
    with pytest.raises(ValueError, match="is not a number"):
        feedback(tiny_model("sd15"), candidates="1, lots")
