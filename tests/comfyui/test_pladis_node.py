"""PLADIS on real ComfyUI models (tiny random weights): the node's cross-attention equals an independent
PLADIS attention (explicit softmax and α-entmax/sparsemax) put into ComfyUI's own hooks, in the batched
cond+uncond call and at cfg 1; scale 0 is the model itself; the output changes; the input model is
unchanged; joint-attention DiTs are refused with a message naming the node."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch
from entmax import entmax15, sparsemax

from guidance_kit.nodes import attention_methods as A
from guidance_kit.nodes import perturbation as P
from tests.comfyui.harness import ksample, out, rel_diff, tiny_model

STEPS = 3


def pladis(model, scale=2.0, function="entmax1.5"):
    return out(A.PLADISNode.execute(model, scale, function))


def reference_attention(q, k, v, heads, scale, function, mask=None):
    """Dense softmax and sparse attention written out ([B, L, H·D] in and out), extrapolated."""
    b, lq, hd = q.shape
    d = hd // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2).float() for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / d ** 0.5
    dense = logits.softmax(-1) @ vh
    sparse = (entmax15 if function == "entmax1.5" else sparsemax)(logits, dim=-1) @ vh
    result = dense + scale * (sparse - dense)
    return result.transpose(1, 2).reshape(b, lq, hd).to(q.dtype)


def unet_reference(model, scale, function):
    """PLADIS through ComfyUI's own attn2 replace API on every transformer layer (no Guidance Kit code)."""
    from guidance_kit.nodes.runtime.blocks import unet_layers

    m = model.clone()

    def attn2(q, k, v, extra):
        return reference_attention(q, k, v, extra["n_heads"], scale, function)

    for group, block, layer in unet_layers(m.model.diffusion_model):
        m.set_model_attn2_replace(attn2, group, block, layer)
    return m


def wan_reference(model, scale, function):
    """PLADIS on WAN through a plain optimized_attention_override: the calls whose keys are not the queries'
    tokens (the text cross-attention) get the explicit PLADIS attention."""
    m = model.clone()

    def override(func, q, k, v, heads, *args, **kwargs):
        if k.shape[1] != q.shape[1] and not kwargs.get("skip_reshape", False):
            return reference_attention(q, k, v, heads, scale, function)
        return func(q, k, v, heads, *args, **kwargs)

    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return m


@pytest.mark.parametrize("function", ["entmax1.5", "sparsemax"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_unet_equals_an_independent_pladis_attention(function, cfg):
    model = tiny_model("sd15")
    ours = ksample(pladis(model, 2.0, function), "sd15", cfg, steps=STEPS, batch=2)
    reference = ksample(unet_reference(model, 2.0, function), "sd15", cfg, steps=STEPS, batch=2)
    assert rel_diff(ours, reference) < 1e-4
    assert rel_diff(ours, ksample(model, "sd15", cfg, steps=STEPS, batch=2)) > 1e-3


@pytest.mark.parametrize("family, cfg", [("wan21", 1.0), ("wan21", 4.0), ("ltxv", 4.0)])
def test_cross_attention_dits_equal_an_independent_pladis_attention(family, cfg):
    """WAN and LTXV (an all-ones text mask in the harness: the reference ignores it)."""
    model = tiny_model(family)
    ours = ksample(pladis(model, 1.5), family, cfg, steps=STEPS)
    reference = ksample(wan_reference(model, 1.5, "entmax1.5"), family, cfg, steps=STEPS)
    assert rel_diff(ours, reference) < 1e-4
    assert rel_diff(ours, ksample(model, family, cfg, steps=STEPS)) > 1e-3


def test_scale_zero_and_scale_one():
    model = tiny_model("sd15")
    plain = ksample(model, "sd15", 1.0, steps=STEPS)
    assert torch.equal(ksample(pladis(model, 0.0), "sd15", 1.0, steps=STEPS), plain)
    sparse_only = ksample(pladis(model, 1.0, "sparsemax"), "sd15", 1.0, steps=STEPS)
    assert rel_diff(sparse_only, ksample(unet_reference(model, 1.0, "sparsemax"), "sd15", 1.0, steps=STEPS)) < 1e-4


def test_input_model_unchanged_and_one_pladis_per_chain():
    model = tiny_model("sd15")
    before = ksample(model, "sd15", 1.0, steps=STEPS)
    patched = pladis(model)
    assert torch.equal(ksample(model, "sd15", 1.0, steps=STEPS), before)
    with pytest.raises(ValueError, match="PLADIS.*already has PLADIS"):
        pladis(patched)


def test_stacks_with_a_perturbation_branch():
    """PLADIS acts on every row, the PAG branch's too; the PAG term still acts on top of it."""
    model = tiny_model("sd15")
    with_pladis = pladis(model)
    pag = out(P.PAGNode.execute(with_pladis, 3.0, "auto", "constant", 0.0, 1.0))
    assert rel_diff(ksample(pag, "sd15", 4.0, steps=STEPS), ksample(with_pladis, "sd15", 4.0, steps=STEPS)) > 1e-3


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_image"])
def test_joint_attention_families_are_refused(family):
    with pytest.raises(ValueError, match="PLADIS.*joint attention"):
        pladis(tiny_model(family))


def test_missing_entmax_is_refused_at_the_node_with_the_install_command(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "entmax" else real_find_spec(name, *args))
    with pytest.raises(Exception, match="entmax.*requirements.txt"):
        pladis(tiny_model("sd15"))
