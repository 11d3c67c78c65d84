"""Families are matched by the diffusion model's exact class (never a base class), blocks are checked at the
node, and LTXV's split or skipped self-attention (newer ComfyUI) is handled or refused, never mis-perturbed.

ComfyUI 0.38's classes cannot be built here; the matching is tested with stand-in subclasses of the tiny
0.3.64 models' classes carrying the newer names (``LTXAVModel(LTXVModel)`` ...), and newer LTXV's guide-mask
query split with a patched LTXV attention that makes the same attention calls.
"""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import dataclasses
from types import SimpleNamespace

import comfy.ldm.lightricks.model as ltx
import comfy.ldm.modules.attention as comfy_attention
import pytest
import torch

from guidance_kit.guiders.plan import Branch
from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes.contributors import block_perturbation as perturbations
from guidance_kit.nodes.contributors import time_input
from guidance_kit.nodes.runtime import families, slots
from guidance_kit.nodes.runtime.engine import BRANCH_MAP_KEY
from tests.comfyui.harness import ALL_FAMILIES, ksample, out, rel_diff, tiny_model

CFG = 4.0
STEPS = 3

# the exact classes ComfyUI 0.3.64 builds for the harness families, and the family each is served as
EXPECTED = {
    "sd15": ("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel", "UNet (SD1.5/SDXL)"),
    "flux": ("comfy.ldm.flux.model.Flux", "Flux"),
    "sd3": ("comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper", "SD3/SD3.5"),
    "wan21": ("comfy.ldm.wan.model.WanModel", "WAN"),
    "chroma": ("comfy.ldm.chroma.model.Chroma", "Chroma"),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model.HunyuanVideo", "HunyuanVideo"),
    "qwen_image": ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel", "Qwen-Image"),
    "ltxv": ("comfy.ldm.lightricks.model.LTXVModel", "LTXV"),
}


def patcher_of(net):
    """The parts of a ModelPatcher the family checks read."""
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=net, process_timestep=lambda t, **kw: t))


def stand_in(family: str, name: str, module: str):
    """An (uninitialised) instance of a subclass of the tiny model's class named like a newer ComfyUI class."""
    base = type(tiny_model(family).model.diffusion_model)
    cls = type(name, (base,), {"__module__": module})
    return cls.__new__(cls)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_each_tiny_model_is_its_exact_class_and_family(family):
    net = tiny_model(family).model.diffusion_model
    qualified, name = EXPECTED[family]
    assert families.qualified_name(type(net)) == qualified
    assert families.family_of(tiny_model(family), "PAG").name == name


@pytest.mark.parametrize("family, name, module, says", [
    ("ltxv", "LTXAVModel", "comfy.ldm.lightricks.av_model",
     r"LTX-2 \(audio-video\).*LTXV's LTXVModel.*\(video, audio\)"),
    ("wan21", "WanAnimate2Model", "comfy.ldm.wan.model_animate2", r"WAN Animate 2.*WAN's WanModel.*per latent frame"),
    ("wan21", "CausalWanModel", "comfy.ldm.wan.ar_model", r"WAN causal.*without ComfyUI's block patches"),
    ("wan21", "WanDancerModel", "comfy.ldm.wan.model_wandancer", r"WanDancerModel.*not been verified"),
    ("flux", "Flux3", "comfy.ldm.flux3.model", r"Flux3 \(from comfy.ldm.flux3.model\).*Flux's Flux"),
])
def test_a_newer_subclass_of_a_served_family_is_refused_at_the_node(family, name, module, says):
    model = patcher_of(stand_in(family, name, module))
    for node, call in ((P.PAGNode, lambda: P.PAGNode.execute(model, 2.0, "auto", "constant", 0.0, 1.0)),
                       (P.SEGNode, lambda: P.SEGNode.execute(model, 2.0, 10000.0, "auto", "constant", 0.0, 1.0)),
                       (P.SkipLayerNode, lambda: P.SkipLayerNode.execute(model, 2.0, "auto", "constant", 0.0, 1.0))):
        with pytest.raises(ValueError, match=says) as info:
            call()
        message = str(info.value)
        assert message.startswith(node.LABEL + ":")
        assert "CFG-space methods" in message and name in message


def test_nag_and_tsg_refuse_ltx2_with_the_reason():
    model = patcher_of(stand_in("ltxv", "LTXAVModel", "comfy.ldm.lightricks.av_model"))
    with pytest.raises(families.FamilyError, match=r"^NAG: .*LTX-2 .*newer subclass of LTXV"):
        families.nag_family_of(model, "NAG")
    with pytest.raises(families.FamilyError, match=r"^TSG: LTX-2 .*\(video, audio\) pair of time inputs"):
        time_input.family_for_time_input(model)


def test_anima_is_not_served_as_cosmos_predict2_by_nag():
    from comfy.ldm.cosmos.predict2 import MiniTrainDIT

    anima = type("Anima", (MiniTrainDIT,), {"__module__": "comfy.ldm.anima.model"})
    with pytest.raises(families.FamilyError, match=r"^NAG: .*Anima.*newer subclass of Cosmos Predict2.*adapter"):
        families.nag_family_of(patcher_of(anima.__new__(anima)), "NAG")
    assert families.nag_family_of(patcher_of(MiniTrainDIT.__new__(MiniTrainDIT)), "NAG").name == "Cosmos Predict2"


def test_newer_ltxv_image_model_is_served_like_ltxv():
    # ComfyUI 0.38: comfy.ldm.lightricks.model.LTXVImageModel(LTXVModel)
    LTXVImageModel = type("LTXVImageModel", (ltx.LTXVModel,), {"__module__": "comfy.ldm.lightricks.model"})
    assert families.family_of(patcher_of(LTXVImageModel.__new__(LTXVImageModel)), "PAG").name == "LTXV"


def test_missing_block_list_or_attention_module_is_an_error_at_the_node_naming_the_family():
    net = tiny_model("flux").model.diffusion_model
    spec = families.family_of(tiny_model("flux"), "PAG")
    families.check_blocks(net, spec, "PAG")  # the real model has what the hooks use
    with pytest.raises(families.FamilyError, match=r"^PAG: this Flux model \(Flux\) has no 'joint_blocks' block list"):
        families.check_blocks(net, dataclasses.replace(spec, groups=(("double", "joint_blocks"),)), "PAG")
    with pytest.raises(families.FamilyError, match=r"^PAG: Flux block double_blocks.0 .*no 'self_attn' attention"):
        families.check_blocks(net, dataclasses.replace(spec, block_parts=(("double", "self_attn"),)), "PAG")


def _block_call(spec_name: str, operator: str, **args):
    """One DiT block hook call with a branch row (rows: [cond, branch])."""
    spec = families.FAMILIES_BY_NAME[spec_name]
    p = perturbations.Perturbation(operator.upper(), operator, spec_name, blocks=(("double", 0),))
    operators = {"identity_attention": "PAG", "smoothed_attention": "SEG"}
    p = dataclasses.replace(p, method=operators.get(operator, p.method))
    to = {BRANCH_MAP_KEY: {2: Branch("b", perturbation=p)}, "cond_or_uncond": [0, 2], **args.pop("options", {})}
    hook = slots.DitBlockHook(spec, ("double", 0), contributors=(perturbations.CONTRIBUTOR,))
    return hook({"transformer_options": to, **args}, {"original_block": lambda a: {"img": a["img"]}})


def test_a_block_whose_tokens_are_not_one_tensor_is_an_error_not_a_crash():
    pair = (torch.zeros(2, 4, 8), torch.zeros(2, 3, 8))  # LTX-2's (video, audio)
    with pytest.raises(families.FamilyError, match=r"LTXV block 0 received tuple .*\(video, audio\) pair"):
        _block_call("LTXV", "identity_attention", img=pair)


def test_ltxv_guide_mask_with_seg_and_stg_skipped_self_attention_are_refused():
    img = torch.zeros(2, 4, 8)
    with pytest.raises(families.FamilyError, match=r"^SEG \(LTXV\): .*guide attention mask.*Use PAG"):
        _block_call("LTXV", "smoothed_attention", img=img, self_attention_mask=object())
    _block_call("LTXV", "identity_attention", img=img, self_attention_mask=object())  # PAG handles the split
    with pytest.raises(families.FamilyError, match=r"^PAG \(LTXV\): block 0's self-attention is already replaced"):
        _block_call("LTXV", "identity_attention", img=img, options={"stg_skip_self_attn": True})


# ------------------------------------------------------------------------------------------------
# newer LTXV's attention calls, reproduced on the 0.3.64 LTXV block
# ------------------------------------------------------------------------------------------------

def split_self_attention(guide_tokens: int, skip_self: bool = False):
    """An LTXV CrossAttention.forward that, for the self-attention, makes the calls newer ComfyUI makes
    with a guide mask (``_attention_with_guide_mask``: noisy queries, then guide queries, each against
    all keys, with a zero additive mask here so the result equals one call), or none (STG skip)."""
    original = ltx.CrossAttention.forward

    def forward(self, x, context=None, mask=None, pe=None, transformer_options={}):  # noqa: B006 (LTXV's own)
        if context is not None:
            return original(self, x, context=context, mask=mask, pe=pe, transformer_options=transformer_options)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if skip_self:
            return self.to_out(v)
        q, k = self.q_norm(q), self.k_norm(k)
        if pe is not None:
            q, k = ltx.apply_rotary_emb(q, pe), ltx.apply_rotary_emb(k, pe)
        total = q.shape[1]
        start = total - guide_tokens
        result = torch.empty_like(q)
        for part in (slice(0, start), slice(start, total)):
            bias = torch.zeros(1, 1, part.stop - part.start, total, dtype=q.dtype)
            result[:, part] = comfy_attention.optimized_attention(q[:, part], k, v, self.heads, mask=bias,
                                                                  transformer_options=transformer_options)
        return self.to_out(result)

    return forward


def pag(m, layers="auto"):
    return out(P.PAGNode.execute(m, 2.0, layers, "constant", 0.0, 1.0))


def seg(m, sigma=10000.0):
    return out(P.SEGNode.execute(m, 2.0, sigma, "auto", "constant", 0.0, 1.0))


def test_pag_on_ltxv_self_attention_split_into_query_groups_equals_the_single_call(monkeypatch):
    base = tiny_model("ltxv")
    plain = ksample(base, "ltxv", CFG, STEPS)
    single = ksample(pag(base), "ltxv", CFG, STEPS)
    monkeypatch.setattr(ltx.CrossAttention, "forward", split_self_attention(guide_tokens=8))
    assert rel_diff(ksample(base, "ltxv", CFG, STEPS), plain) <= 1e-5  # the split itself changes nothing
    split = ksample(pag(base), "ltxv", CFG, STEPS)
    assert rel_diff(split, single) <= 1e-5  # PAG acts on both query groups exactly as on one call
    assert rel_diff(split, plain) > 1e-3


def test_seg_on_split_ltxv_self_attention_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ltx.CrossAttention, "forward", split_self_attention(guide_tokens=8))
    with pytest.raises(RuntimeError, match=r"^SEG \(LTXV\): ComfyUI runs this block's self-attention as several "
                                           r"calls over query groups"):
        ksample(seg(tiny_model("ltxv")), "ltxv", CFG, STEPS)


def test_a_block_without_its_self_attention_call_is_an_error_not_a_perturbed_cross_attention(monkeypatch):
    monkeypatch.setattr(ltx.CrossAttention, "forward", split_self_attention(0, skip_self=True))
    with pytest.raises(RuntimeError, match=r"^PAG \(LTXV\): block 1's first attention call has 32 queries against "
                                           r"6 keys, not the self-attention"):
        ksample(pag(tiny_model("ltxv")), "ltxv", CFG, STEPS)


def test_seg_with_reference_tokens_beyond_the_latent_grid_is_a_clear_error():
    p = perturbations.Perturbation("SEG", "smoothed_attention", "Flux", sigma=10000.0)
    q = torch.randn(1, 20, 8)  # 16 latent tokens + 4 reference tokens
    with pytest.raises(RuntimeError, match=r"20 image tokens but the latent's token grid \(4, 4\) holds 16"):
        perturbations.perturbed_attention(p, q, q, q, 2, False, False, None, None, (4, 4))


def test_s2_drop_memo_survives_its_size_limit():
    """The per-σ dropped-block memo is shared module state: filling it past its limit must not lose the entry
    being returned (it used to clear itself between storing and reading the entry)."""
    p = perturbations.Perturbation("S²-Guidance", "drop", "Flux", blocks=tuple(("double", i) for i in range(1, 9)),
                           drop_ratio=0.25, seed=3)
    expected = perturbations.dropped_blocks(p, 7)
    perturbations._DROP_CACHE.clear()
    for noise in range(5000):
        dropped = perturbations.dropped_blocks(p, noise)
        assert len(dropped) == 2
    assert perturbations.dropped_blocks(p, 7) == expected and len(perturbations._DROP_CACHE) <= 4096
