"""Cosmos Predict2 (MiniTrainDIT) beyond the shared per-family node tests (test_perturbation_nodes runs every block
method, TSG and ICG on it, and the batched branch against a separate forward; test_nag_node runs NAG): its blocks
have no block-replace, so each hooked block's forward is patched (runtime/block_forward.py) and its tokens are a
[B, T, H, W, D] grid; a batch of two latents, fp16/bf16, and NAG with the block methods in one call."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch

from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import nag as N
from guidance_kit.nodes.runtime import blocks as model_blocks
from guidance_kit.nodes.runtime import families
from tests.comfyui.harness import conditioning, counted, ksample, out, rel_diff, tiny_model
from tests.comfyui.test_perturbation_nodes import pag, s2g, seg, slg, tpg

FAMILY = "cosmos_predict2"
CFG = 4.0
STEPS = 3
BLOCK_METHODS = {"PAG": pag, "SEG": seg, "TPG": tpg, "SLG": slg, "S2G": s2g}


def test_the_family_row_and_its_block_patches():
    model = tiny_model(FAMILY)
    spec = families.family_of(model, "PAG")
    assert spec.name == "Cosmos Predict2" and spec.block_hook == "forward" and not spec.joint
    layout = model_blocks.block_layout(model, spec)
    assert families.auto_layers("PAG", spec, layout) == "double 1"
    patched = pag(model)
    assert "diffusion_model.blocks.1.forward" in patched.object_patches
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_every_block_method_and_nag_in_one_batched_call_with_a_batch_of_two():
    base = tiny_model(FAMILY)
    model = base
    for method in BLOCK_METHODS.values():
        model = method(model)
    model = out(N.NAGNode.execute(out(cm.APGNode.execute(model, 0.0, 15.0, -0.5)), conditioning(FAMILY, 7),
                                  N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0))
    model, counter = counted(model)
    both = ksample(model, FAMILY, CFG, STEPS, batch=2, seed=3)
    assert torch.isfinite(both).all()
    assert counter.calls == STEPS and counter.batches == [2 * 7] * STEPS  # 2 latents × (cond, uncond, 5 branches)
    assert rel_diff(both, ksample(base, FAMILY, CFG, STEPS, batch=2, seed=3)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_give_finite_outputs(dtype):
    base = tiny_model(FAMILY, dtype=dtype)
    for method in BLOCK_METHODS.values():
        assert torch.isfinite(ksample(method(base), FAMILY, CFG, STEPS)).all()
