"""Cost per step of Online Feedback CFG's evaluators, relative to plain CFG in the same run (CPU, one thread).

    python benchmarks/online_feedback_cost.py [--steps 20] [--repeats 3]

Digits model (batch of 10 digits, 5 candidates): plain CFG vs the digit classifier evaluated at every step. Tiny
SD1.5 model (harness, 8×8 latent, batch 2, 3 candidates): plain CFG vs the CLIP vision + VAE evaluator with tiny
random-weight encoders (ComfyUI's ClipVisionModel and TAESD) at every step. Prints seconds per step (median of the
repeats after a warm-up) and the ratio; on real models the evaluator's share is its cost against a full UNet step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)

import tests.conftest  # noqa: E402,F401  (registers the package as guidance_kit, finds ComfyUI)
from tests.comfyui import harness  # noqa: E402  (ComfyUI on sys.path)


def per_step(run, steps: int, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def tiny_encoders():
    import comfy.clip_vision
    import comfy.sd
    import comfy.taesd.taesd

    config = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
              "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.json"
        path.write_text(json.dumps(config))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    harness.init_random_(clip_vision.model, seed=3)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    harness.init_random_(taesd, seed=4)
    return clip_vision, comfy.sd.VAE(sd=taesd.state_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from guidance_kit.digits.model import UNET_WEIGHTS, load_digits_model
    from guidance_kit.digits.sampling import sample
    from guidance_kit.nodes.seed_papers import OnlineFeedbackCFGNode

    common = {"start_percent": 0.0, "end_percent": 1.0, "budget": 0, "tolerance": 0.0}
    loaded = load_digits_model(UNET_WEIGHTS)
    digits = list(range(10))
    feedback = OnlineFeedbackCFGNode.execute(loaded.patcher, "digit classifier: adherence", "1, 2, 3, 5, 7.5",
                                             **common).result[0]
    rows = [("digits, CFG", lambda: sample(loaded.patcher, loaded, digits, 0, 3.0, steps=args.steps)),
            ("digits, digit classifier (5 candidates)", lambda: sample(feedback, loaded, digits, 0, 3.0,
                                                                       steps=args.steps))]
    clip_vision, vae = tiny_encoders()
    base = harness.tiny_model("sd15")
    clip_model = OnlineFeedbackCFGNode.execute(base, "CLIP vision + VAE", "1, 4, 7", **common, clip_vision=clip_vision,
                                               vae=vae, preview_size=8).result[0]
    g = torch.Generator().manual_seed(7)
    positive = [[torch.randn(1, 6, 64, generator=g), {"pooled_output": torch.randn(1, 16, generator=g)}]]
    negative = [[torch.randn(1, 6, 64, generator=g), {}]]
    rows += [("tiny SD1.5, CFG", lambda: harness.ksample(base, "sd15", 4.0, steps=args.steps, positive=positive,
                                                         negative=negative, batch=2)),
             ("tiny SD1.5, CLIP vision + VAE (3 candidates)",
              lambda: harness.ksample(clip_model, "sd15", 4.0, steps=args.steps, positive=positive, negative=negative,
                                      batch=2))]
    results = [(name, per_step(run, args.steps, args.repeats)) for name, run in rows]
    print(f"{'run':48} {'ms/step':>8} {'× CFG':>6}")
    for i, (name, seconds) in enumerate(results):
        ratio = seconds / results[i - i % 2][1]
        print(f"{name:48} {seconds * 1000:8.2f} {ratio:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
