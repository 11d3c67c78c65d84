"""S-CFG, Semantic-aware CFG, and its region map (nodes/scfg.py)."""

from __future__ import annotations

from ..graph import IMAGE, LATENT, MODEL, Node, Workflow
from .common import GUIDANCE_ID, NEG_SD, SDXL, checkpoint_workflow, custom_sampler_workflow


def wf_scfg_sdxl_with_map() -> Workflow:
    wf = checkpoint_workflow(
        "scfg_sdxl_with_map", "S-CFG per-region scales + its region map (S-CFG Map → Preview)", "SDXL", SDXL,
        [("GuidanceKit_SCFG", {})],
        "a red fox and a white rabbit sitting side by side in a flower meadow, golden hour", NEG_SD,
        cfg=6.0)
    wf.nodes += [
        Node(33, "GuidanceKit_SCFGMap", 4, {"show": "regions", "step": -1},
             {"model": (GUIDANCE_ID, MODEL), "samples": (3, LATENT)}),
        Node(34, "PreviewImage", 5, links={"images": (33, IMAGE)}),
    ]
    return wf


def wf_stack_scfg_apg_guider_sdxl() -> Workflow:
    return custom_sampler_workflow(
        "stack_scfg_apg_guider_sdxl", "Stack: S-CFG + APG in the Guidance Guider (cfg 7)", "SDXL", SDXL,
        [("GuidanceKit_SCFG", {}), ("GuidanceKit_APG", {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5})],
        ("KSamplerSelect", {"sampler_name": "euler"}), 7.0,
        "a teddy bear reading a book to a small robot in a cosy library, warm light", NEG_SD)
