"""NAG, Normalized Attention Guidance (nodes/nag.py): at cfg 1 on a distilled model, and with CFG."""

from __future__ import annotations

from ..graph import CLIP, COND, Node, Workflow
from .common import FLUX_DEV, GUIDANCE_ID, NEG_SD, PROMPT_COLORS, SDXL, checkpoint_workflow


def wf_nag_flux_schnell_cfg1() -> Workflow:
    wf = checkpoint_workflow(
        "nag_flux_schnell_cfg1", "NAG negative prompt at cfg 1 on Flux schnell (4 steps)", "Flux schnell",
        FLUX_DEV, [("GuidanceKit_NAG", {})], "a portrait of an AI researcher in a sunlit office, 50mm photo", "",
        ckpt="flux1-schnell-fp8.safetensors", steps=4)
    wf.nodes.insert(3, Node(32, "CLIPTextEncode", 1, {"text": "glasses"}, {"clip": (4, CLIP)}, title="NAG negative",
                            color=PROMPT_COLORS["negative"]))
    wf.node(GUIDANCE_ID).links["nag_negative"] = (32, COND)
    return wf


def wf_nag_sdxl_with_cfg() -> Workflow:
    wf = checkpoint_workflow(
        "nag_sdxl_with_cfg", "NAG + CFG on SDXL (NAG negative = the negative prompt)", "SDXL", SDXL,
        [("GuidanceKit_NAG", {"sigma_end": 4.0})],
        "a cat sitting on a windowsill, rainy city outside, cinematic light", NEG_SD, cfg=5.0)
    wf.node(GUIDANCE_ID).links["nag_negative"] = (7, COND)
    return wf
