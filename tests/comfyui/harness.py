"""ComfyUI test harness: import ComfyUI on CPU, build tiny models, sample through real paths.

Tiny models are ComfyUI's own model classes (``supported_models.<Family>(unet_config).get_model``)
with random weights, wrapped in a real ModelPatcher; they sample in milliseconds per step on CPU.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.conftest import COMFYUI_HOW, COMFYUI_PATH, comfy_setup

if COMFYUI_PATH is None:
    pytest.skip(COMFYUI_HOW, allow_module_level=True)

# ComfyUI first on sys.path (its top-level modules must win over this repo's folders), on the CPU, without
# parsing pytest's command line
comfy_setup.import_comfyui(COMFYUI_PATH, cpu=True)

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402

nodes = comfy_setup.comfyui_module("nodes")  # ComfyUI's nodes.py, never the pack's nodes/ package

logging.getLogger("guidance_kit").setLevel(logging.INFO)

FAMILIES = ("sd15", "flux", "sd3", "wan21")

CONFIGS = {
    "sd15": (comfy.supported_models.SD15, dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
        transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=64,
        use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
        use_spatial_transformer=True, legacy=False, num_heads=2, num_head_channels=-1, use_temporal_resblock=False,
        num_classes=None)),
    "flux": (comfy.supported_models.Flux, dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=64,
        mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True)),
    "sd3": (comfy.supported_models.SD3, dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, num_patches=None, pos_embed_max_size=16,
        adm_in_channels=32, context_embedder_config={"target": "torch.nn.Linear",
                                                     "params": {"in_features": 64, "out_features": 128}},
        qk_norm="rms", pos_embed_scaling_factor=None)),
    "wan21": (comfy.supported_models.WAN21_T2V, dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=128, ffn_dim=256,
        freq_dim=256, text_dim=4096, out_dim=16, num_heads=1, num_layers=2, window_size=(-1, -1), qk_norm=True,
        cross_attn_norm=True, eps=1e-6)),
}

CONFIGS.update({
    "chroma": (comfy.supported_models.Chroma, dict(
        image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64, hidden_size=64, mlp_ratio=4.0,
        num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=64, n_layers=2)),
    "hunyuan_video": (comfy.supported_models.HunyuanVideo, dict(
        image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
        hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=256,
        patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False)),
    "qwen_image": (comfy.supported_models.QwenImage, dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12))),
    "ltxv": (comfy.supported_models.LTXV, dict(
        in_channels=128, cross_attention_dim=64, attention_head_dim=32, num_attention_heads=2, caption_channels=64,
        num_layers=2)),
})
CONFIGS.update({
    "lumina2": (comfy.supported_models.Lumina2, dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=4, n_refiner_layers=1, n_heads=2,
        n_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64,
        axes_dims=[8, 12, 12], axes_lens=[300, 512, 512])),
    # ComfyUI 0.3.64's Mochi asserts the real MLP width (1536 × 8): two blocks of the real width, 32-wide text
    "mochi": (comfy.supported_models.GenmoMochi, dict(
        image_model="mochi_preview", depth=2, patch_size=2, num_heads=2, hidden_size_x=1536, hidden_size_y=32,
        mlp_ratio_x=8.0, mlp_ratio_y=2.0, in_channels=12, qk_norm=True, qkv_bias=False, out_bias=True,
        patch_embed_bias=True, timestep_mlp_bias=True, timestep_scale=1000.0, t5_feat_dim=64, t5_token_length=16,
        rope_theta=10000.0, use_t5=True, learn_sigma=False)),
    "cosmos_predict2": (comfy.supported_models.CosmosT2IPredict2, dict(
        image_model="cosmos_predict2", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=64, num_blocks=2, num_heads=2,
        crossattn_emb_channels=64, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
        use_adaln_lora=True, adaln_lora_dim=16, extra_per_block_abs_pos_emb=False)),
    # two double- and two single-stream blocks with four routed experts; one Llama layer per block (llama_layers)
    "hidream": (comfy.supported_models.HiDream, dict(
        image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=32, num_attention_heads=2, caption_channels=[64, 48], text_emb_dim=32,
        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[16, 8, 8], max_resolution=[32, 32],
        llama_layers=[0, 1, 2, 3])),
    # Cosmos 1 (GeneralDIT): [T, H, W, B, D] tokens; ComfyUI 0.3.64 needs the per-block position embedding
    "cosmos": (comfy.supported_models.CosmosT2V, dict(
        image_model="cosmos", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, model_channels=64, block_config="FA-CA-MLP", concat_padding_mask=True,
        pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop", block_x_format="THWBD",
        affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=16, num_blocks=2, num_heads=2,
        crossattn_emb_channels=64, extra_per_block_abs_pos_emb=True, extra_per_block_abs_pos_emb_type="learnable")),
})
# HunyuanImage 2.1 (ComfyUI 0.3.64): HunyuanVideo's class without a pooled vector and with ByT5 glyph tokens, the
# interface of HunyuanVideo 1.5 (newer ComfyUI); not in the family lists (its ByT5 mapper is the real width)
CONFIGS["hunyuan_image21"] = (comfy.supported_models.HunyuanImage21, dict(
    image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=64, hidden_size=64,
    mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 16], theta=256, patch_size=[1, 1],
    qkv_bias=True, guidance_embed=False, byt5=True, meanflow=False))
MORE_FAMILIES = ("chroma", "hunyuan_video", "qwen_image", "ltxv")
NEW_FAMILIES = ("lumina2", "mochi", "cosmos_predict2", "hidream", "cosmos")  # issue 16: the families users run today
HIDREAM_LLAMA = (4, 48)  # the tiny HiDream's Llama 3.1 layers and their width (conditioning_llama3)
ALL_FAMILIES = FAMILIES + MORE_FAMILIES

LATENT_SHAPES = {"sd15": (1, 4, 16, 16), "flux": (1, 16, 16, 16), "sd3": (1, 16, 16, 16), "wan21": (1, 16, 3, 8, 8),
                 "chroma": (1, 16, 16, 16), "hunyuan_video": (1, 16, 3, 8, 8), "qwen_image": (1, 16, 1, 16, 16),
                 "ltxv": (1, 128, 2, 4, 4), "lumina2": (1, 16, 12, 16),
                 "mochi": (1, 12, 2, 8, 8), "cosmos_predict2": (1, 16, 1, 8, 8), "hidream": (1, 16, 16, 16),
                 "hunyuan_image21": (1, 16, 8, 8), "cosmos": (1, 16, 2, 8, 8)}
CONTEXT = {"sd15": 64, "flux": 64, "sd3": 64, "wan21": 4096, "chroma": 64, "hunyuan_video": 64, "qwen_image": 64,
           "ltxv": 64, "lumina2": 64, "mochi": 64, "cosmos_predict2": 64, "hidream": 64,
           "hunyuan_image21": 64, "cosmos": 64}


def init_random_(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights start uninitialised: normal(0, 1/√fan_in) for matrices, 1 for norm scales, 0 for biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name or name.endswith("scale") or name.endswith(".weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if b.is_floating_point() and "pos_embed" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


_MODELS: dict[tuple, comfy.model_patcher.ModelPatcher] = {}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """A fresh ModelPatcher (clone) around a cached tiny model of the family.

    ``seed`` picks the random weights (another seed = another model of the family, e.g. a second
    checkpoint); ``dtype`` the inference dtype (fp16/bf16 models for the precision checks).
    """
    key = (family, seed, dtype)
    if key not in _MODELS:
        cls, unet_config = CONFIGS[family]
        config = cls(dict(unet_config))
        config.set_inference_dtype(dtype, None)
        model = config.get_model({})
        init_random_(model.diffusion_model, seed)  # built in ``dtype`` (layers a family keeps in fp32 stay so)
        _MODELS[key] = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                        offload_device=torch.device("cpu"))
    return _MODELS[key].clone()


def conditioning(family: str, seed: int, tokens: int = 6) -> list:
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if family in ("flux", "sd3", "chroma", "hunyuan_video", "hidream"):
        extra["pooled_output"] = torch.randn(1, 32, generator=g)
    if family == "hidream":  # the Llama 3.1 hidden layers, [batch, layers, tokens, width]
        extra["conditioning_llama3"] = torch.randn(1, HIDREAM_LLAMA[0], tokens, HIDREAM_LLAMA[1], generator=g)
    if family in ("flux", "hunyuan_video"):
        extra["guidance"] = 3.5
    if family in ("ltxv", "lumina2", "mochi"):  # Lumina2 and Mochi read their caption length from the mask
        extra["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
    return [[torch.randn(1, tokens, CONTEXT[family], generator=g), extra]]


def latent(family: str, batch: int = 1) -> torch.Tensor:
    shape = LATENT_SHAPES[family]
    return torch.zeros((batch,) + shape[1:])


def noise_for(family: str, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return comfy.sample.prepare_noise(latent(family, batch), seed)


def ksample(model, family: str, cfg: float, steps: int = 6, sampler: str = "euler", scheduler: str = "normal",
            seed: int = 0, batch: int = 1, positive=None, negative=None) -> torch.Tensor:
    """The KSampler node's path: comfy.sample.sample → CFGGuider."""
    positive = positive if positive is not None else conditioning(family, 1)
    negative = negative if negative is not None else conditioning(family, 2)
    return comfy.sample.sample(model, noise_for(family, seed, batch), steps, cfg, sampler, scheduler, positive,
                               negative, latent(family, batch), disable_pbar=True, seed=seed)


def sigmas_for(model, steps: int, scheduler: str = "normal") -> torch.Tensor:
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def custom_advanced(guider, family: str, steps: int = 6, sampler: str = "euler", scheduler: str = "normal",
                    seed: int = 0, batch: int = 1) -> torch.Tensor:
    """SamplerCustomAdvanced's path, through ComfyUI's node class."""
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    sigmas = sigmas_for(guider.model_patcher, steps, scheduler)
    out, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(seed), guider, comfy.samplers.sampler_object(sampler),
                                            sigmas, {"samples": latent(family, batch)})
    return out["samples"]


def cfg_guider(model, family: str, cfg: float):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(conditioning(family, 1), conditioning(family, 2))
    guider.set_cfg(cfg)
    return guider


class CallCounter:
    """Counts diffusion-model forwards and their batch sizes via an APPLY_MODEL wrapper."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, executor, x, *args, **kwargs):
        self.batches.append(int(x.shape[0]))
        return executor(x, *args, **kwargs)

    @property
    def calls(self) -> int:
        return len(self.batches)


def counted(model) -> tuple[comfy.model_patcher.ModelPatcher, CallCounter]:
    counter = CallCounter()
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_counter", counter)
    return m, counter


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

import comfy.utils  # noqa: E402

comfy.utils.PROGRESS_BAR_ENABLED = False


def out(node_output, index: int = 0):
    """The value of a V3 node's output (NodeOutput) or a V1 node's tuple."""
    result = getattr(node_output, "result", node_output)
    return result[index]
