"""Perturbation guidance (nodes/perturbation.py: PAG, SEG, TPG, Skip-Layer, S²-Guidance, TSG, ICG), a stack
with APG, and Adaptive Guidance (nodes/adaptive.py)."""

from __future__ import annotations

from ..graph import CLIP, COND, IMAGE, LATENT, MODEL, VAE, Node, Workflow
from .common import (
    NEG_SD,
    NEG_SD3,
    NEG_WAN,
    PROMPT_COLORS,
    SD15,
    SD35,
    SDXL,
    SEED,
    checkpoint_workflow,
    note_node,
    wan21_t2v_workflow,
)


def wf_pag_sdxl() -> Workflow:
    return checkpoint_workflow(
        "pag_sdxl", "PAG (scale 3) on SDXL, middle block", "SDXL", SDXL,
        [("GuidanceKit_PAG", {"scale": 3.0, "layers": "auto"})],
        "an old lighthouse on a rocky coast during a storm, crashing waves, dramatic sky", NEG_SD,
        cfg=5.0)


def wf_seg_sd15() -> Workflow:
    return checkpoint_workflow(
        "seg_sd15", "SEG (infinite blur) on SD1.5", "SD1.5", SD15,
        [("GuidanceKit_SEG", {"scale": 3.0, "blur_sigma": 10000.0})],
        "a cozy reading nook with a window seat, rain outside, warm lamp light", NEG_SD, cfg=5.0)


def wf_tpg_sdxl() -> Workflow:
    return checkpoint_workflow(
        "tpg_sdxl", "TPG (scale 3) on SDXL, official layers", "SDXL", SDXL,
        [("GuidanceKit_TPG", {"scale": 3.0, "layers": "auto", "seed": 0})],
        "a watercolor painting of a mountain village at dawn, mist in the valley", NEG_SD, cfg=5.0)


def wf_skip_layer_sd35() -> Workflow:
    return checkpoint_workflow(
        "skip_layer_sd35", "Skip-layer guidance on SD3.5 Medium (layers 7-9)", "SD3.5 Medium", SD35,
        [("GuidanceKit_SkipLayer", {"scale": 2.8, "layers": "auto", "start_percent": 0.01, "end_percent": 0.2})],
        "a hand holding a glass marble with a tiny galaxy inside, macro photo", NEG_SD3)


def wf_s2_guidance_sd35() -> Workflow:
    return checkpoint_workflow(
        "s2_guidance_sd35", "S²-Guidance (ω 0.25, 10% blocks) on SD3.5 Medium", "SD3.5 Medium", SD35,
        [("GuidanceKit_S2Guidance", {"scale": 0.25, "drop_ratio": 0.1, "seed": 0})],
        "a red vintage bicycle leaning against a yellow wall with ivy, street photography", NEG_SD3)


def wf_tsg_sd15_unconditional() -> Workflow:
    return checkpoint_workflow(
        "tsg_sd15_unconditional", "TSG: guidance for unconditional generation (empty prompt, cfg 1)", "SD1.5",
        SD15, [("GuidanceKit_TSG", {"scale": 2.0, "perturb": "time embedding (paper)", "s": 2.0, "alpha": 1.0,
                                    "seed": 0})], "", "", cfg=1.0)


def wf_icg_sdxl() -> Workflow:
    return checkpoint_workflow(
        "icg_sdxl", "ICG: CFG without the empty prompt (cfg 6)", "SDXL", SDXL,
        [("GuidanceKit_ICG", {"seed": 0})],
        "a portrait of an elderly fisherman with a knitted hat, natural light, 85mm", NEG_SD, cfg=6.0)


def wf_stack_apg_pag_schedule_sdxl() -> Workflow:
    return checkpoint_workflow(
        "stack_apg_pag_schedule_sdxl", "Stack: APG + PAG + cosine schedule (cfg 8)", "SDXL", SDXL,
        [("GuidanceKit_APG", {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5}),
         ("GuidanceKit_PAG", {"scale": 2.0}),
         ("GuidanceKit_CFGSchedule", {"schedule": "cosine_increasing"})],
        "a bustling night market in the rain, neon signs reflected in puddles, cinematic", NEG_SD,
        cfg=8.0)


def wf_pag_mochi_video() -> Workflow:
    """Mochi as ComfyUI's own Mochi example loads it (UNETLoader, T5-XXL CLIPLoader type mochi, the Mochi VAE,
    30 Euler steps at cfg 4.5), PAG on the middle block before the sampler."""
    name = "pag_mochi_video"
    nodes = [
        Node(4, "UNETLoader", 0, {"unet_name": "mochi_preview_bf16.safetensors", "weight_dtype": "default"}),
        Node(31, "CLIPLoader", 0, {"clip_name": "t5xxl_fp16.safetensors", "type": "mochi", "device": "default"}),
        Node(32, "VAELoader", 0, {"vae_name": "mochi_vae.safetensors"}),
        note_node(name),
        Node(6, "CLIPTextEncode", 1, {"text": "a hummingbird hovers next to a red flower in a sunlit garden, slow "
                                              "motion, shallow depth of field"},
             {"clip": (31, CLIP)}, title="Positive prompt", color=PROMPT_COLORS["positive"]),
        Node(7, "CLIPTextEncode", 1, {"text": NEG_WAN}, {"clip": (31, CLIP)}, title="Negative prompt",
             color=PROMPT_COLORS["negative"]),
        Node(5, "EmptyMochiLatentVideo", 1, {"width": 848, "height": 480, "length": 37}),
        Node(10, "GuidanceKit_PAG", 2, {"scale": 1.5, "layers": "auto"}, {"model": (4, MODEL)}),
        Node(3, "KSampler", 3, {"seed": SEED, "steps": 30, "cfg": 4.5, "sampler_name": "euler", "scheduler": "simple"},
             {"model": (10, MODEL), "positive": (6, COND), "negative": (7, COND), "latent_image": (5, LATENT)}),
        Node(8, "VAEDecode", 4, links={"samples": (3, LATENT), "vae": (32, VAE)}),
        Node(9, "SaveAnimatedWEBP", 5, {"filename_prefix": f"guidance_kit/{name}", "fps": 24.0, "lossless": False,
                                        "quality": 90, "method": "default"}, {"images": (8, IMAGE)}),
    ]
    return Workflow(name, "Video: PAG on Mochi (middle block, scale 1.5), SaveAnimatedWEBP", "Mochi", nodes)


def wf_flowmo_wan21() -> Workflow:
    return wan21_t2v_workflow(
        "flowmo_wan21", "Video: FlowMo motion coherence on WAN 2.1 T2V, SaveAnimatedWEBP",
        "a dolphin jumping out of ocean waves at sunset, splashing water, smooth natural motion", 5.0,
        [("GuidanceKit_FlowMo", {"learning_rate": 0.005, "iterations": 1, "start_percent": 0.0, "end_percent": 0.5})],
        {"steps": 50, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple"})
