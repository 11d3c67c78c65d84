"""Each model family's ComfyUI internals Guidance Kit relies on (the blocks' arguments, the modules its hooks
reach, the attention calls they see), checked against the ComfyUI in use; ComfyUI's own internals are
test_compatibility_contract.py. Where a use depends on behaviour, the case runs the family's tiny model of
ComfyUI's own classes and records what ComfyUI hands over.
"""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.patcher_extension
import pytest
import torch

from guidance_kit.nodes.contributors import time_input
from guidance_kit.nodes.runtime import families, slots
from tests.comfyui.contract import keywords, positional, recorded, registry
from tests.comfyui.harness import ALL_FAMILIES, NEW_FAMILIES, ksample, tiny_model

CONTRACT, internal = registry()


# block arguments the pack reads, per family; 'allowed' = every key ComfyUI 0.3.64 and 0.38 pass, so that a new
# argument (a changed block call) fails here and gets reviewed
DIT_ARGS = {
    "flux": ({"img", "txt", "vec", "pe", "transformer_options"}, {"img", "vec", "pe", "transformer_options"},
             {"img", "txt", "vec", "pe", "attn_mask", "transformer_options"}),
    "chroma": ({"img", "txt", "vec", "pe", "transformer_options"}, {"img", "vec", "pe", "transformer_options"},
               {"img", "txt", "vec", "pe", "attn_mask", "transformer_options"}),
    "sd3": ({"img", "txt", "vec", "transformer_options"}, None, {"img", "txt", "vec", "transformer_options"}),
    "wan21": ({"img", "txt", "vec", "pe", "transformer_options"}, None,
              {"img", "txt", "vec", "pe", "transformer_options"}),
    "hunyuan_video": ({"img", "txt", "vec", "pe", "transformer_options"}, {"img", "vec", "pe", "transformer_options"},
                      {"img", "txt", "vec", "pe", "attention_mask", "modulation_dims_img", "modulation_dims_txt",
                       "modulation_dims", "txt_len", "attn_mask", "transformer_options"}),
    "qwen_image": ({"img", "txt", "vec", "pe", "transformer_options"}, None,
                   {"img", "txt", "vec", "pe", "transformer_options", "encoder_hidden_states_mask"}),
    "ltxv": ({"img", "txt", "vec", "pe", "transformer_options"}, None,
             {"img", "txt", "vec", "pe", "attention_mask", "transformer_options", "self_attention_mask",
              "prompt_timestep"}),
    "mochi": ({"img", "txt", "vec", "transformer_options"}, None,
              {"img", "txt", "vec", "rope_cos", "rope_sin", "num_tokens", "transformer_options"}),
}


def _dit_case(family: str):
    def check():
        spec = families.exact_spec(families.FAMILIES, tiny_model(family).model.diffusion_model)
        seen = recorded(family)["dit"]
        double_needs, single_needs, allowed = DIT_ARGS[family]
        for group, _attr in spec.groups:
            key = (f"{group}_block", 0)
            assert key in seen, f"patches_replace['dit'][{key}] was never called"
            args, img_is_tensor, out_keys = seen[key][0]
            needs = double_needs if group == "double" else single_needs
            assert needs <= set(args), (key, sorted(needs - set(args)))
            assert set(args) <= allowed | {"attn_mask"}, (key, sorted(set(args) - allowed))
            assert img_is_tensor, key
            assert "img" in out_keys and (group != "double" or not spec.joint or "txt" in out_keys), out_keys
        assert recorded(family)["override"] > 0  # blocks reach optimized_attention_override
        families.check_blocks(tiny_model(family).model.diffusion_model, spec, "contract")
    return check


for _family in DIT_ARGS:
    internal(f"patches_replace['dit'] block args and attention modules: {_family}")(_dit_case(_family))


# ------------------------------------------------------------------------------------------------
# TSG's time-embedding modules, NAG's pooled modulation, ICG's pooled inputs (nodes/contributors/time_input.py,
# nodes/contributors/nag_modulation.py, nodes/contributors/condition.py)
# ------------------------------------------------------------------------------------------------

def _time_embedding_case(family: str):
    def check():

        net = tiny_model(family).model.diffusion_model
        site = time_input.SITES.get(families.qualified_name(type(net)))
        assert site is not None, f"no time-embedding site for {families.qualified_name(type(net))}"
        module = time_input._module_at(net, site.path)
        assert isinstance(module, torch.nn.Module), site.path
        seen = []
        handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            ksample(tiny_model(family), family, 4.0, 1)
        finally:
            handle.remove()
        assert seen, f"{site.path} is not called in a forward of {family}"
        out = seen[0][0] if site.tuple_output else seen[0]
        assert torch.is_tensor(out) and out.ndim >= 2, f"{site.path} returns {type(out)}"
    return check


for _family in ALL_FAMILIES + NEW_FAMILIES:
    if _family != "chroma":  # no time embedding of its own: TSG refuses paper mode there (test_tsg_icg.py)
        internal(f"TSG time-embedding module called in a forward: {_family}")(_time_embedding_case(_family))


@internal("NAG pooled modulation: Flux/HunyuanVideo vector_in, txt_mod, modulation; SD3 y_embedder, context_block")
def _():
    from guidance_kit.nodes.contributors import nag_modulation

    for family, name in (("flux", "Flux"), ("hunyuan_video", "HunyuanVideo")):
        net = tiny_model(family).model.diffusion_model
        site = nag_modulation.SITES[name]
        assert isinstance(getattr(net, site.embedder), torch.nn.Module)
        assert isinstance(getattr(net.params, site.width), int)
        assert all(hasattr(b, "txt_mod") for b in net.double_blocks)
        assert all(hasattr(b, "modulation") for b in net.single_blocks)
    net = tiny_model("sd3").model.diffusion_model
    assert isinstance(getattr(net, nag_modulation.SITES["SD3/SD3.5"].embedder), torch.nn.Module)
    for block in net.joint_blocks:
        positional(type(block.context_block).pre_attention, "x", "c")
        assert callable(block.context_block.post_attention)


@internal("ICG pooled inputs: SDXL-style 'y' (ADM) and 'pooled_output' conditioning reach the model as 'y'")
def _():
    seen = {}

    def spy(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        seen.setdefault("keys", set()).update(kwargs)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    model = tiny_model("flux")
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "contract", spy)
    ksample(model, "flux", 4.0, 1)
    assert "y" in seen["keys"], sorted(seen["keys"])


# ------------------------------------------------------------------------------------------------
# Lumina2 / NextDiT (nodes/runtime/lumina.py): no block-replace; object patches of its layers' forward.
# Source-checked against the newest stored Comfy-Org/ComfyUI comfy/ldm/lumina/model.py (not runnable here): the
# main layers are still called as layer(img, mask, freqs_cis, adaln_input, timestep_zero_index=...,
# transformer_options=...) with block_index/block_type set in transformer_options; context_refiner layers as
# layer(cap_feats, cap_mask, cap_freqs_cis, transformer_options=...); captions padded by pad_zimage with
# cap_pad_token to pad_tokens_multiple after cap_embedder; image tokens padded with x_pad_token at position 0;
# q/k/v reach the override as tensors (wrap_attn unpacks its AttentionTensorContainer).
# ------------------------------------------------------------------------------------------------

def _lumina_calls():
    """What a Lumina2 forward hands its first main layer and first caption-refiner layer, and the override."""
    model = tiny_model("lumina2")
    net = model.model.diffusion_model
    seen = {"layer": [], "refiner": [], "override": []}
    hooks = [net.layers[0].register_forward_pre_hook(lambda _m, a, k: seen["layer"].append((a, k)), with_kwargs=True),
             net.context_refiner[0].register_forward_pre_hook(lambda _m, a, k: seen["refiner"].append((a, k)),
                                                              with_kwargs=True)]

    def override(func, *args, **kwargs):
        seen["override"].append((args, kwargs))
        return func(*args, **kwargs)

    model.model_options.setdefault("transformer_options", {})[slots.OVERRIDE_KEY] = override
    try:
        ksample(model, "lumina2", 4.0, 1)
    finally:
        for hook in hooks:
            hook.remove()
    return net, seen


@internal("Lumina2 NextDiT: main layers called as layer(x, x_mask, freqs_cis, adaln_input, transformer_options=)")
def _():
    from comfy.ldm.lumina.model import JointTransformerBlock

    positional(JointTransformerBlock.forward, "x", "x_mask", "freqs_cis", "adaln_input")
    keywords(JointTransformerBlock.forward, "transformer_options")
    net, seen = _lumina_calls()
    args, kwargs = seen["layer"][0]
    assert len(args) == 4 and set(kwargs) <= {"transformer_options", "timestep_zero_index"}, (len(args), kwargs)
    assert torch.is_tensor(args[0]) and args[0].ndim == 3
    assert isinstance(kwargs["transformer_options"], dict)
    families.check_blocks(net, families.exact_spec(families.FAMILIES, net), "contract")


@internal("Lumina2 NextDiT: context_refiner layers called as layer(cap, cap_mask, cap_freqs, transformer_options=)")
def _():
    _net, seen = _lumina_calls()
    args, kwargs = seen["refiner"][0]
    assert len(args) == 3 and set(kwargs) == {"transformer_options"}, (len(args), kwargs)
    assert args[2].shape[1] == args[0].shape[1]  # one rotary table per caption token


@internal("Lumina2 NextDiT: rotary tables [B, L, 1, D/2, 2, 2]; caption tokens differ on the sequence axis only")
def _():
    net, seen = _lumina_calls()
    freqs = seen["layer"][0][0][2]
    assert freqs.ndim == 6 and freqs.shape[-2:] == (2, 2), tuple(freqs.shape)
    sequence_axis = net.axes_dims[0] // 2
    eye = torch.eye(2)
    assert torch.allclose(freqs[:, 1:4, :, sequence_axis:].float(), eye.expand_as(freqs[:, 1:4, :, sequence_axis:]))


@internal("Lumina2 NextDiT: one attention call per layer through the override, [B, H, L, D] with skip_reshape")
def _():
    net, seen = _lumina_calls()
    layer_calls = [(a, k) for a, k in seen["override"] if k.get("skip_reshape")]
    assert layer_calls and all(a[0].ndim == 4 for a, _k in layer_calls)
    # caption refiner, noise refiner and main layers: one call each per model call
    assert len(seen["override"]) == len(net.context_refiner) + len(net.noise_refiner) + len(net.layers)


@internal("Lumina2: the model call gets num_tokens (0.3.x keeps only that many caption tokens without a mask)")
def _():
    seen = {}

    def spy(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        seen["num_tokens"] = kwargs.get("num_tokens")
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    model = tiny_model("lumina2")
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "contract", spy)
    ksample(model, "lumina2", 4.0, 1)
    assert isinstance(seen["num_tokens"], int), seen


@internal("Cosmos Predict2 MiniTrainDIT: blocks called as block(x [B, T, H, W, D], emb, crossattn, "
          "transformer_options=...); the self-attention is a block's first attention call, over T·H·W tokens")
def _():
    model = tiny_model("cosmos_predict2")
    net = model.model.diffusion_model
    seen = {"block": [], "override": []}
    hook = net.blocks[0].register_forward_pre_hook(lambda _m, a, k: seen["block"].append((a, k)), with_kwargs=True)

    def override(func, *args, **kwargs):
        seen["override"].append(args[1].shape[2] if kwargs.get("skip_reshape") else args[1].shape[1])
        return func(*args, **kwargs)

    model.model_options.setdefault("transformer_options", {})[slots.OVERRIDE_KEY] = override
    try:
        ksample(model, "cosmos_predict2", 4.0, 1)
    finally:
        hook.remove()
    args, kwargs = seen["block"][0]
    assert args[0].ndim == 5 and isinstance(kwargs.get("transformer_options"), dict), (args[0].shape, sorted(kwargs))
    tokens = args[0].shape[1] * args[0].shape[2] * args[0].shape[3]
    assert seen["override"][0] == tokens  # self-attention first (keys = the block's tokens), then cross-attention
    families.check_blocks(net, families.exact_spec(families.FAMILIES, net), "contract")


# ------------------------------------------------------------------------------------------------
# HiDream (nodes/runtime/block_forward.py, KeywordBlockForward): no block-replace; object patches of its blocks'
# forward. The newest stored Comfy-Org/ComfyUI comfy/ldm/hidream/model.py is the test ComfyUI's (0.3.64) file.
# ------------------------------------------------------------------------------------------------

HIDREAM_BLOCK_ARGS = {"image_tokens", "image_tokens_masks", "text_tokens", "adaln_input", "rope", "transformer_options"}


@internal("HiDream: blocks called with keywords only (image_tokens, text_tokens, ..., transformer_options); double "
          "blocks return (image, text) and run one attention call over [image, text]; single blocks carry [image, "
          "text] in image_tokens with text_tokens=None, its text as long as the last double block's")
def _():
    from comfy.ldm.hidream.model import HiDreamImageBlock

    positional(HiDreamImageBlock.forward, "image_tokens", "image_tokens_masks", "text_tokens", "adaln_input", "rope",
               "transformer_options")
    model = tiny_model("hidream")
    net = model.model.diffusion_model
    seen = {"double": [], "single": [], "override": []}
    hooks = [net.double_stream_blocks[-1].register_forward_hook(
                 lambda _m, a, k, out: seen["double"].append((a, k, out)), with_kwargs=True),
             net.single_stream_blocks[0].register_forward_hook(
                 lambda _m, a, k, out: seen["single"].append((a, k, out)), with_kwargs=True)]

    def override(func, *args, **kwargs):
        seen["override"].append((args[0].shape[1], args[3] if len(args) > 3 else kwargs.get("heads")))
        return func(*args, **kwargs)

    model.model_options.setdefault("transformer_options", {})[slots.OVERRIDE_KEY] = override
    try:
        ksample(model, "hidream", 4.0, 1)
    finally:
        for hook in hooks:
            hook.remove()
    args, kwargs, result = seen["double"][0]
    assert args == () and set(kwargs) == HIDREAM_BLOCK_ARGS, (len(args), sorted(kwargs))
    assert isinstance(kwargs["transformer_options"], dict) and kwargs["image_tokens_masks"] is None
    image, text = kwargs["image_tokens"].shape[1], kwargs["text_tokens"].shape[1]
    assert isinstance(result, tuple) and [t.shape[1] for t in result] == [image, text]
    args, kwargs, result = seen["single"][0]
    assert args == () and set(kwargs) == HIDREAM_BLOCK_ARGS and kwargs["text_tokens"] is None
    assert kwargs["image_tokens"].shape[1] == image + text and torch.is_tensor(result)
    # one attention call per block, [B, L, H·D] over the joint tokens
    blocks = len(net.double_stream_blocks) + len(net.single_stream_blocks)
    assert len(seen["override"]) == blocks and all(length == image + text for length, _h in seen["override"])
    families.check_blocks(net, families.exact_spec(families.FAMILIES, net), "contract")


@internal("Cosmos 1 GeneralDIT: blocks a ModuleDict ('block0', ...) called as block(x [T, H, W, B, D], emb, crossattn, "
          "mask, transformer_options=...); the self-attention first, [B, H, T·H·W, D] with skip_reshape, (t h w) order")
def _():
    from comfy.ldm.cosmos.blocks import GeneralDITTransformerBlock

    positional(GeneralDITTransformerBlock.forward, "x", "emb_B_D", "crossattn_emb", "crossattn_mask")
    keywords(GeneralDITTransformerBlock.forward, "transformer_options")
    model = tiny_model("cosmos")
    net = model.model.diffusion_model
    assert list(net.blocks.keys())[:2] == ["block0", "block1"]
    seen = {"block": [], "override": []}
    hook = net.blocks["block0"].register_forward_pre_hook(lambda _m, a, k: seen["block"].append((a, k)),
                                                          with_kwargs=True)

    def override(func, *args, **kwargs):
        seen["override"].append((tuple(args[0].shape), tuple(args[1].shape), kwargs.get("skip_reshape")))
        return func(*args, **kwargs)

    model.model_options.setdefault("transformer_options", {})[slots.OVERRIDE_KEY] = override
    try:
        ksample(model, "cosmos", 4.0, 1)
    finally:
        hook.remove()
    args, kwargs = seen["block"][0]
    frames, height, width, batch = args[0].shape[:4]
    assert args[0].ndim == 5 and batch == 2 and isinstance(kwargs.get("transformer_options"), dict)
    query, key, skip_reshape = seen["override"][0]
    assert skip_reshape and query[0] == batch and key[2] == frames * height * width  # self-attention first
    families.check_blocks(net, families.exact_spec(families.FAMILIES, net), "contract")


@pytest.mark.parametrize("name", list(CONTRACT), ids=list(CONTRACT))
def test_internal(name):
    CONTRACT[name]()

