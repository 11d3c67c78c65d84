"""The guidance samplers (nodes/samplers.py): CFG++ DPM++ 2M/3M SDE and PCG, with SamplerCustomAdvanced."""

from __future__ import annotations

from ..graph import Workflow
from .common import NEG_SD, NEG_SD3, SD15, SD35, SDXL, custom_sampler_workflow


def wf_cfgpp_dpmpp_2m_sde_apg_sdxl() -> Workflow:
    return custom_sampler_workflow(
        "cfgpp_dpmpp_2m_sde_apg_sdxl", "DPM++ 2M SDE CFG++ (λ 0.7) + APG with SamplerCustomAdvanced", "SDXL", SDXL,
        [("GuidanceKit_APG", {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5})],
        ("GuidanceKit_SamplerDPMPP2MSDECFGPP", {"noise_device": "cpu"}), 0.7,
        "a hummingbird hovering next to a red hibiscus flower, macro photo, bokeh", NEG_SD, steps=25)


def wf_cfgpp_dpmpp_3m_sde_sd35() -> Workflow:
    return custom_sampler_workflow(
        "cfgpp_dpmpp_3m_sde_sd35", "DPM++ 3M SDE CFG++ (λ 0.6) on a flow model", "SD3.5 Medium", SD35, [],
        ("GuidanceKit_SamplerDPMPP3MSDECFGPP", {"noise_device": "cpu"}), 0.6,
        "an isometric diorama of a tiny bakery at dawn, warm light, highly detailed", NEG_SD3)


def wf_pcg_sd15() -> Workflow:
    return custom_sampler_workflow(
        "pcg_sd15", "PCG predictor-corrector sampler (γ 9, K 1)", "SD1.5", SD15, [],
        ("GuidanceKit_SamplerPCG", {"corrector_steps": 1, "step_scale": 0.5}), 9.0,
        "a cottage in a snowy forest at dusk, warm windows, smoke from the chimney", NEG_SD)
