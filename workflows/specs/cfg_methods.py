"""CFG-space methods (nodes/cfg_methods.py), the Guidance Guider, their stacks and a video workflow."""

from __future__ import annotations

from ..graph import Workflow
from .common import (
    FLUX_DEV,
    NEG_SD,
    NEG_SD3,
    SD15,
    SD35,
    SDXL,
    checkpoint_workflow,
    custom_sampler_workflow,
    wan21_t2v_workflow,
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
    return wan21_t2v_workflow(
        "wan21_t2v_cfg_zero_tcfg", "Video: CFG-Zero* (official WAN setting) + TCFG, SaveAnimatedWEBP",
        "a red panda walks along a mossy branch in a misty forest, slow camera pan, soft morning light, shallow "
        "depth of field", 8.0,
        [("GuidanceKit_CFGZeroStar", {"optimized_scale": True, "zero_init_steps": 2}), ("GuidanceKit_TCFG", {})],
        {"steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple"})
