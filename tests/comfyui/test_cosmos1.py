"""Cosmos 1 (GeneralDIT) beyond the shared per-family node tests (test_perturbation_nodes runs every block method, TSG
and ICG on it, and the batched branch against a separate forward): its blocks are a ModuleDict ('block0', ...)
without a block-replace, carrying the tokens as [T, H, W, B, D]; each hooked block's forward is patched and
presents them batch first (runtime/block_forward.py). A batch of two latents (rows must not mix along the fourth
axis), fp16/bf16, stacking with CFG-space terms, and NAG refused with the reason."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch

from guidance_kit.nodes import nag as N
from guidance_kit.nodes.runtime import blocks as model_blocks
from guidance_kit.nodes.runtime import families
from tests.comfyui.harness import conditioning, ksample, tiny_model
from tests.comfyui.test_perturbation_nodes import BLOCK_METHODS, check_every_block_method_in_one_batched_call, pag

FAMILY = "cosmos"
CFG = 4.0
STEPS = 3


def test_the_family_row_and_its_block_patches():
    model = tiny_model(FAMILY)
    spec = families.family_of(model, "PAG")
    assert spec.name == "Cosmos" and spec.block_hook == "batch_fourth" and not spec.joint
    layout = model_blocks.block_layout(model, spec)
    assert layout.dit_blocks == {"double": 2}
    assert families.auto_layers("PAG", spec, layout) == "double 1"
    patched = pag(model)
    assert "diffusion_model.blocks.block1.forward" in patched.object_patches
    assert "patches_replace" not in patched.model_options.get("transformer_options", {})


def test_every_block_method_in_one_batched_call_with_a_batch_of_two_stacked_with_cfg_space_terms():
    check_every_block_method_in_one_batched_call(FAMILY, CFG, STEPS)  # rows must not mix along the fourth axis


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_give_finite_outputs(dtype):
    base = tiny_model(FAMILY, dtype=dtype)
    for method in BLOCK_METHODS.values():
        assert torch.isfinite(ksample(method(base), FAMILY, CFG, STEPS)).all()


def test_nag_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"^NAG: NAG has no attention hook for Cosmos\. Why: its self- and "
                                         r"cross-attention are one Attention class.* negative prompt with cfg > 1"):
        N.NAGNode.execute(tiny_model(FAMILY), conditioning(FAMILY, 7), N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0)
