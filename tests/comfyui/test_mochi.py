"""Mochi (Genmo's AsymmDiTJoint) beyond the shared per-family node tests (test_perturbation_nodes runs every block
method, TSG and ICG on it): its joint blocks through ComfyUI's block-replace ([video, caption] in one attention
call, the caption cropped to its unpadded length), a batch of two latents, bf16 (Mochi's inference dtypes are
bf16 and fp32), stacks with CFG-space terms, and NAG refused with the reason. The tiny model has ComfyUI 0.3.64's
asserted MLP width (1536 × 8) in two blocks."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch

from guidance_kit.nodes import nag as N
from guidance_kit.nodes.runtime import blocks as model_blocks
from guidance_kit.nodes.runtime import families
from tests.comfyui.harness import conditioning, ksample, tiny_model
from tests.comfyui.test_perturbation_nodes import BLOCK_METHODS, check_every_block_method_in_one_batched_call

FAMILY = "mochi"
CFG = 4.0
STEPS = 2


def test_the_family_row_and_its_defaults():
    model = tiny_model(FAMILY)
    spec = families.family_of(model, "PAG")
    assert spec.name == "Mochi" and spec.joint and spec.image_first and spec.block_hook == "dit"
    layout = model_blocks.block_layout(model, spec)
    assert families.auto_layers("PAG", spec, layout) == "double 1"
    assert families.auto_layers("S²-Guidance", spec, layout) == "double all"


def test_every_block_method_in_one_batched_call_with_a_batch_of_two():
    check_every_block_method_in_one_batched_call(FAMILY, CFG, STEPS, cfg_zero_star=False, rows_apart=False)


def test_bf16_model_gives_finite_outputs():
    base = tiny_model(FAMILY, dtype=torch.bfloat16)
    assert base.model.get_dtype() == torch.bfloat16
    for method in BLOCK_METHODS.values():
        assert torch.isfinite(ksample(method(base), FAMILY, CFG, STEPS)).all()


def test_nag_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"^NAG: NAG has no attention hook for Mochi\. Why: its joint attention keeps "
                                         r"only the caption's first num_tokens"):
        N.NAGNode.execute(tiny_model(FAMILY), conditioning(FAMILY, 7), N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0)
