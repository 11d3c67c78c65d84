"""CFG-space methods (nodes/cfg_methods.py), the Guidance Guider, their stacks and a video workflow."""

from __future__ import annotations

from ..graph import CLIP, COND, IMAGE, LATENT, MODEL, VAE, Node, Workflow
from .common import (
    FLUX_DEV,
    NEG_SD,
    NEG_SD3,
    NEG_WAN,
    PROMPT_COLORS,
    SD15,
    SD35,
    SDXL,
    SEED,
    checkpoint_workflow,
    custom_sampler_workflow,
    note_node,
)


def wf_cfg_schedule_sdxl() -> Workflow:
    return checkpoint_workflow(
        "cfg_schedule_sdxl", "CFG Schedule as the guidance interval (σ ∈ (0.28, 5.42]), paper values", "SDXL", SDXL,
        [("GuidanceKit_CFGSchedule", {"schedule": "constant", "sigma_high": 5.42, "sigma_low": 0.28})],
        "an isometric illustration of a cozy reading nook with plants, a cat asleep on a stack of books, warm lamp "
        "light, highly detailed", NEG_SD, cfg=8.0)


def wf_beta_cfg_sd15() -> Workflow:
    return checkpoint_workflow(
        "beta_cfg_sd15", "β-CFG, the official example (a 2, b 3, γ 1) at its SD1.5 strength (cfg 15 per element)",
        "SD1.5", SD15,
        [("GuidanceKit_BetaCFG", {"a": 2.0, "b": 3.0, "gamma": 1.0, "normalize_peak": False,
                                  "normalization": "per-element RMS (resolution-independent)"})],
        "a portrait of a dog, studio lighting, sharp focus, detailed fur", NEG_SD, cfg=15.0)


def wf_apg_sdxl() -> Workflow:
    return checkpoint_workflow(
        "apg_sdxl", "APG at high cfg (12) without over-saturation", "SDXL", SDXL,
        [("GuidanceKit_APG", {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5})],
        "a cinematic photo of a red fox in a snowy birch forest at golden hour, detailed fur, shallow depth of field",
        NEG_SD, cfg=12.0)


def wf_tcfg_sdxl() -> Workflow:
    return checkpoint_workflow(
        "tcfg_sdxl", "TCFG (no parameters) at the usual cfg", "SDXL", SDXL,
        [("GuidanceKit_TCFG", {})],
        "a macro photograph of a dew-covered dragonfly resting on a reed, soft morning light, bokeh", NEG_SD)


def wf_cfg_zero_star_flux() -> Workflow:
    return checkpoint_workflow(
        "cfg_zero_star_flux", "CFG-Zero* zero-init on the guidance-distilled Flux dev (cfg 1)", "Flux dev", FLUX_DEV,
        [("GuidanceKit_CFGZeroStar", {"optimized_scale": False, "zero_init_steps": 1})],
        "a neon sign that reads \"Guidance Kit\" above a narrow rainy alley at night, reflections on wet asphalt, "
        "cinematic", "", flux_guidance=3.5)


def wf_fdg_sdxl() -> Workflow:
    return checkpoint_workflow(
        "fdg_sdxl", "FDG with the paper's SDXL scales \"10, 5\"", "SDXL", SDXL,
        [("GuidanceKit_FDG", {"scales": "10, 5"})],
        "a detailed oil painting of a lighthouse on a cliff during a storm, dramatic waves, seagulls", NEG_SD, cfg=10.0)


def wf_rescale_sd35() -> Workflow:
    return checkpoint_workflow(
        "rescale_sd35", "Flow-aware Rescale (0.7) at a high cfg (7)", "SD3.5 Medium", SD35,
        [("GuidanceKit_Rescale", {"multiplier": 0.7})],
        "a steaming bowl of ramen on a dark wooden table, soft window light, food photography", NEG_SD3, cfg=7.0)


def wf_guidance_guider_sdxl() -> Workflow:
    return custom_sampler_workflow(
        "guidance_guider_sdxl", "Guidance Guider (TCFG + cosine schedule) with SamplerCustomAdvanced", "SDXL", SDXL,
        [("GuidanceKit_TCFG", {}), ("GuidanceKit_CFGSchedule", {"schedule": "cosine_increasing"})],
        ("KSamplerSelect", {"sampler_name": SDXL["sampler_name"]}), 7.0,
        "a watercolor map of a fantasy harbour town, fine ink lines, compass rose, muted colours", NEG_SD)


def wf_stack_apg_schedule_rescale_sdxl() -> Workflow:
    return checkpoint_workflow(
        "stack_apg_schedule_rescale_sdxl", "Stack: APG + CFG Schedule (linear_increasing) + Rescale at cfg 12",
        "SDXL", SDXL,
        [("GuidanceKit_APG", {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5}),
         ("GuidanceKit_CFGSchedule", {"schedule": "linear_increasing"}),
         ("GuidanceKit_Rescale", {"multiplier": 0.5})],
        "a portrait of an elderly fisherman, weathered skin, knitted cap, overcast harbour light, 85mm photo",
        NEG_SD, cfg=12.0)


def wf_stack_cfg_zero_fdg_sd35() -> Workflow:
    return checkpoint_workflow(
        "stack_cfg_zero_fdg_sd35", "Stack on a flow model: CFG-Zero* + FDG \"5, 2.5\"", "SD3.5 Medium", SD35,
        [("GuidanceKit_CFGZeroStar", {"optimized_scale": True, "zero_init_steps": 1}),
         ("GuidanceKit_FDG", {"scales": "5, 2.5"})],
        "a glass terrarium holding a tiny mossy landscape with a sleeping fox, soft window light, macro photo",
        NEG_SD3, cfg=5.0)


def wf_wan21_t2v_cfg_zero_tcfg() -> Workflow:
    name = "wan21_t2v_cfg_zero_tcfg"
    nodes = [
        Node(4, "UNETLoader", 0, {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}),
        Node(31, "CLIPLoader", 0, {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                   "device": "default"}),
        Node(32, "VAELoader", 0, {"vae_name": "wan_2.1_vae.safetensors"}),
        note_node(name),
        Node(6, "CLIPTextEncode", 1, {"text": "a red panda walks along a mossy branch in a misty forest, slow camera "
                                              "pan, soft morning light, shallow depth of field"},
             {"clip": (31, CLIP)}, title="Positive prompt", color=PROMPT_COLORS["positive"]),
        Node(7, "CLIPTextEncode", 1, {"text": NEG_WAN}, {"clip": (31, CLIP)}, title="Negative prompt",
             color=PROMPT_COLORS["negative"]),
        Node(5, "EmptyHunyuanLatentVideo", 1, {"width": 832, "height": 480, "length": 33}),
        Node(30, "ModelSamplingSD3", 2, {"shift": 8.0}, {"model": (4, MODEL)}),
        Node(10, "GuidanceKit_CFGZeroStar", 2, {"optimized_scale": True, "zero_init_steps": 2},
             {"model": (30, MODEL)}),
        Node(11, "GuidanceKit_TCFG", 2, links={"model": (10, MODEL)}),
        Node(3, "KSampler", 3, {"seed": SEED, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc",
                                "scheduler": "simple"},
             {"model": (11, MODEL), "positive": (6, COND), "negative": (7, COND), "latent_image": (5, LATENT)}),
        Node(8, "VAEDecode", 4, links={"samples": (3, LATENT), "vae": (32, VAE)}),
        Node(9, "SaveAnimatedWEBP", 5, {"filename_prefix": f"guidance_kit/{name}", "fps": 16.0, "lossless": False,
                                        "quality": 90, "method": "default"}, {"images": (8, IMAGE)}),
    ]
    return Workflow(name, "Video: CFG-Zero* (official WAN setting) + TCFG, SaveAnimatedWEBP", "WAN 2.1 T2V 1.3B", nodes)
