"""The Guidance Guider: a GUIDER for SamplerCustomAdvanced that samples a model's guidance plan.

It is ComfyUI's CFGGuider with the engine guaranteed to be installed: the plan comes from the
method nodes chained on the MODEL, the cfg from this node, and predictions go through the same
``sampling_function`` as KSampler, so a plan gives the same numbers on both paths and every other
pre-/post-cfg patch (and CFG++ samplers) keeps working. It takes the positive and negative
conditionings only: the conditionings a method needs besides them are built by the method's own
hooks (ICG's independent condition) or carried by its node (NAG's negative). A model with no plan
samples exactly like CFGGuider.
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from .common import CATEGORY_ROOT, NODE_PREFIX
from .runtime.engine import install_engine


class GuidanceKitGuider(comfy.samplers.CFGGuider):
    def __init__(self, model_patcher):
        patched = model_patcher.clone()
        install_engine(patched)
        super().__init__(patched)


class GuidanceGuiderNode(io.ComfyNode):
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'samples the plan with SamplerCustomAdvanced',
        'all',
        '—',
    )
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "GuidanceGuider",
            display_name="Guidance Guider (for SamplerCustomAdvanced)",
            category=CATEGORY_ROOT,
            description=(
                "A GUIDER that samples the guidance plan of the model (the Guidance Kit method nodes chained on it) "
                "with SamplerCustomAdvanced. Same results as KSampler with the same plan and cfg; all branches of a "
                "step run in one batched model call. Use it where you need a GUIDER (custom sigmas, noise, "
                "samplers)."),
            inputs=[
                io.Model.Input("model", tooltip="The model, with Guidance Kit method nodes applied (or none: then "
                                                "this is plain CFG)."),
                io.Conditioning.Input("positive", tooltip="The prompt to guide towards."),
                io.Conditioning.Input("negative",
                                      tooltip="The negative/empty prompt: the unconditional branch of CFG."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The CFG scale the plan's methods use (FDG's per-band scales replace it). "
                                       "1 = no CFG (the unconditional call is skipped unless a method needs it)."),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced's guider input.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg):
        guider = GuidanceKitGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [GuidanceGuiderNode]
