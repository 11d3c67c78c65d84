"""The embedded digits model (nodes/digits_nodes.py): workflows that run in seconds on a CPU, no download."""

from __future__ import annotations

from ..graph import MODEL, Node, Workflow
from .common import GUIDANCE_ID, digits_workflow


def wf_digits_apg() -> Workflow:
    return digits_workflow("digits_apg", "The embedded digits model (no download): APG vs CFG in seconds on a CPU",
                           [("GuidanceKit_APG", {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5})],
                           cfg=6.0)


def wf_autoguidance_digits() -> Workflow:
    wf = digits_workflow("autoguidance_digits", "Autoguidance on the embedded digits model: its weak version as guide",
                         [("GuidanceKit_Autoguidance", {"scale": 1.0})], cfg=3.0, digit=5)
    wf.nodes.insert(1, Node(31, "GuidanceKit_DigitsModelLoader", 0,
                            {"digit": 5, "weights": "digits weak (for Autoguidance)"}, title="Weak model"))
    wf.node(GUIDANCE_ID).links["weak_model"] = (31, MODEL)
    return wf
