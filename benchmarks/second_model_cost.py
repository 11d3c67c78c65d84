"""Cost of the second-model guidance nodes (Autoguidance, Unconditional Priors, Diffusion-NPO, Personalization
Guidance) vs plain CFG, on tiny ComfyUI models (CPU): time per step, forwards per step (on each model) and
the weight memory the sampled models hold.

    python benchmarks/second_model_cost.py [--steps 8] [--repeats 5] [--families sd15,flux]

Needs a ComfyUI checkout (COMFYUI_PATH or ~/ComfyUI). "weights" counts the unique tensor storages of every
model the run samples with (parameters, ComfyUI's LoRA backups, our LoRA row factors): a LoRA fine-tune and
its base on the same weights (LoraLoader before/after) hold one set, a second checkpoint holds its own.
On tiny CPU models the time mostly measures per-forward overhead (a second model is a second forward).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

# isort: off
import tests.conftest  # noqa: E402,F401  (registers the package as guidance_kit, finds ComfyUI)
from tests.comfyui.harness import CallCounter, counted, ksample, out, rel_diff, tiny_model  # noqa: E402
import comfy.patcher_extension  # noqa: E402
from tests.comfyui.test_second_model import SMALLER, separate_model, with_lora, write_lora  # noqa: E402
from guidance_kit.nodes import model_guidance as MG  # noqa: E402
from guidance_kit.nodes.contributors import row_delta  # noqa: E402
# isort: on

CFG = 4.0
WHOLE_RUN = ("constant", 0.0, 1.0)


def weight_bytes(*patchers) -> int:
    """Unique storages of the patchers' parameters, LoRA backups and row-delta factors."""
    seen, total = set(), 0
    for p in patchers:
        tensors = list(p.model.state_dict().values()) + [b.weight for b in p.backup.values()]
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        total += row_delta.delta_bytes(p)
    return total


def merged(family: str, lora: str):
    """A 'fine-tuned checkpoint': a separately loaded model whose own weights have the LoRA merged in."""
    patched = with_lora(separate_model(family), lora, 1.0)
    patched.patch_model()
    state = {k: v.clone() for k, v in patched.model.state_dict().items()}
    patched.unpatch_model()
    fresh = separate_model(family)
    fresh.model.load_state_dict(state)
    return fresh


def cases(family: str, lora: str) -> dict:
    """name → (sampled model, second model or None); built fresh per call."""
    base = tiny_model(family)
    finetune = with_lora(base, lora, 1.0)  # LoraLoaderModelOnly on the base checkpoint
    second_base = separate_model(family)  # the base as its own checkpoint (same values, own memory)
    finetune_ckpt = merged(family, lora)
    weak = separate_model(family, seed=3, **SMALLER[family])
    return {
        "CFG (LoRA fine-tune)": (finetune, None),
        "Uncond Prior · base via LoRA (same weights)": (out(MG.UnconditionalPriorNode.execute(
            finetune, base, 1.0, *WHOLE_RUN)), None),
        "Uncond Prior · base as 2nd checkpoint": (out(MG.UnconditionalPriorNode.execute(
            finetune_ckpt, second_base, 1.0, *WHOLE_RUN)), second_base),
        "Uncond Prior β=0.5 · 2nd checkpoint": (out(MG.UnconditionalPriorNode.execute(
            finetune_ckpt, second_base, 0.5, *WHOLE_RUN)), second_base),
        "Diffusion-NPO · LoRA on uncond rows": (out(MG.NPONode.execute(base, lora, 1.0, 1.0, *WHOLE_RUN)), None),
        "Personalization λ=0.5 · LoRA rows": (out(MG.PersonalizationGuidanceNode.execute(
            base, lora, 1.0, 0.5, 1.0, *WHOLE_RUN)), None),
        "Autoguidance · smaller 2nd checkpoint": (out(MG.AutoguidanceNode.execute(
            finetune_ckpt, weak, 1.0, *WHOLE_RUN)), weak),
        "Autoguidance · base via LoRA (same weights)": (out(MG.AutoguidanceNode.execute(
            finetune, base, 1.0, *WHOLE_RUN)), None),
    }


def measure(family: str, steps: int, repeats: int, lora: str) -> dict:
    built = cases(family, lora)
    plain = ksample(built["CFG (LoRA fine-tune)"][0], family, CFG, steps)
    runs = {}
    for name, (model, second) in built.items():
        second_counter = None
        if second is not None:  # count the second model's forwards too; before counted(): clones copy wrappers
            second_counter = CallCounter()
            second.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench", second_counter)
        model, counter = counted(model)
        result = ksample(model, family, CFG, steps)  # warm-up
        forwards = counter.calls / steps
        rows = sum(counter.batches) / steps
        if second_counter is not None:
            forwards2, rows2 = second_counter.calls / steps, sum(second_counter.batches) / steps
        else:
            forwards2, rows2 = 0.0, 0.0
        memory = weight_bytes(model, *([second] if second is not None else []))
        runs[name] = (model, forwards, rows, forwards2, rows2, memory, rel_diff(result, plain))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, *_rest) in runs.items():
            start = time.perf_counter()
            ksample(model, family, CFG, steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: (statistics.median(times[name]), *rest) for name, (_, *rest) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default="sd15,flux")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, 1 thread, CPU, {args.steps} euler steps, cfg {CFG}, median of {args.repeats} "
          f"interleaved runs. fwd/rows = forwards and batch rows per step on the sampled model (plain CFG: 1 / 2) "
          f"and on the second model; weights = unique weight storage of both; changes = max relative difference "
          f"of the final latent from plain CFG of the fine-tune\n")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            lora = write_lora(Path(tmp), family, f"bench_{family}.safetensors", seed=21)
            results = measure(family, args.steps, args.repeats, lora)
            base_time = results["CFG (LoRA fine-tune)"][0]
            base_memory = results["CFG (LoRA fine-tune)"][5]
            print(f"## {family}")
            print(f"{'method':46s} {'ms/step':>8s} {'×CFG':>5s} {'fwd':>4s} {'rows':>5s} {'fwd2':>5s} {'rows2':>5s} "
                  f"{'weights MB':>10s} {'×CFG':>5s} {'changes':>8s}")
            for name, (seconds, fwd, rows, fwd2, rows2, memory, diff) in results.items():
                print(f"{name:46s} {seconds * 1e3:8.2f} {seconds / base_time:5.2f} {fwd:4.1f} {rows:5.1f} {fwd2:5.1f} "
                      f"{rows2:5.1f} {memory / 2**20:10.2f} {memory / base_memory:5.2f} {diff:8.3f}")
            print()


if __name__ == "__main__":
    main()
