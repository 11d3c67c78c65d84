"""HiDream (HiDreamImageTransformer2DModel) beyond the shared per-family node tests (test_perturbation_nodes runs
every block method, TSG and ICG on it, and the batched branch against a separate forward): ComfyUI calls its
blocks with keyword arguments only and has no block-replace, so each hooked block's forward is patched
(runtime/block_forward.py); double-stream blocks are joint ([image, text] in one attention call) and return
(image, text), single-stream blocks carry [image, text] in one stream; their feed-forward is a mixture of
experts. A batch of two latents, fp16/bf16, stacking with CFG-space terms, and NAG refused with the reason."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch

from guidance_kit.nodes import nag as N
from guidance_kit.nodes.runtime import blocks as model_blocks
from guidance_kit.nodes.runtime import families, slots
from tests.comfyui.harness import conditioning, ksample, rel_diff, tiny_model
from tests.comfyui.test_perturbation_nodes import BLOCK_METHODS, check_every_block_method_in_one_batched_call, pag

FAMILY = "hidream"
CFG = 4.0
STEPS = 3


def test_the_family_row_and_its_block_patches():
    model = tiny_model(FAMILY)
    spec = families.family_of(model, "PAG")
    assert spec.name == "HiDream" and spec.joint and spec.image_first and spec.block_hook == "keywords"
    layout = model_blocks.block_layout(model, spec)
    assert layout.dit_blocks == {"double": 2, "single": 2}
    assert families.auto_layers("PAG", spec, layout) == "double 1"
    assert families.auto_layers("S²-Guidance", spec, layout) == "double all, single all"
    patched = pag(model, layers="single 1")
    # the single block, and the last double block that records the text length the single blocks need
    assert {"diffusion_model.single_stream_blocks.1.forward",
            "diffusion_model.double_stream_blocks.1.forward"} <= set(patched.object_patches)
    assert "patches_replace" not in patched.model_options.get("transformer_options", {})


@pytest.mark.parametrize("layers", ["double 1", "single 0-1"])
@pytest.mark.parametrize("method", list(BLOCK_METHODS))
def test_each_method_on_each_stream_changes_the_output(method, layers):
    base = tiny_model(FAMILY)
    guided = ksample(BLOCK_METHODS[method](base, layers=layers), FAMILY, CFG, STEPS)
    assert torch.isfinite(guided).all()
    assert rel_diff(guided, ksample(base, FAMILY, CFG, STEPS)) > 1e-3


def test_pag_acts_on_the_image_tokens_of_the_single_stream_only():
    """PAG's identity attention on [image, text] single-stream tokens: the image span comes from the text length
    the last double block recorded (its text tokens = the T5 + Llama tokens the single stream carries)."""
    seen = []
    original = slots.BlockCall.attention_image

    def spy(call):
        span = original(call)
        seen.append((call.key, span, call.args["img"].shape[1]))
        return span

    model = pag(tiny_model(FAMILY), layers="single 0")
    try:
        slots.BlockCall.attention_image = spy
        ksample(model, FAMILY, CFG, 1)
    finally:
        slots.BlockCall.attention_image = original
    image_tokens = (16 // 2) * (16 // 2)
    assert seen and all(key == ("single", 0) and span == slice(0, image_tokens) and total > image_tokens
                        for key, span, total in seen)


def test_every_block_method_in_one_batched_call_with_a_batch_of_two_stacked_with_cfg_space_terms():
    check_every_block_method_in_one_batched_call(FAMILY, CFG, STEPS)  # rows apart: the experts route per token


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_give_finite_outputs(dtype):
    base = tiny_model(FAMILY, dtype=dtype)
    for method in BLOCK_METHODS.values():
        assert torch.isfinite(ksample(method(base), FAMILY, CFG, STEPS)).all()


def test_nag_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"^NAG: NAG has no attention hook for HiDream\. Why: its text reaches every "
                                         r"block as the T5 tokens plus a fresh Llama 3\.1 layer per block.* negative "
                                         r"prompt with cfg > 1"):
        N.NAGNode.execute(tiny_model(FAMILY), conditioning(FAMILY, 7), N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0)
