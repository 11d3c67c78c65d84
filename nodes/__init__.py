"""ComfyUI side of Guidance Kit: the V3 node classes, the runtime (``runtime/``) and the methods' contributors
(``contributors/``)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import (
    adaptive,
    annealing_guidance,
    annealing_plot,
    attention_methods,
    cfg_extensions,
    cfg_methods,
    digits_nodes,
    feedback_guidance,
    flowmo,
    guider,
    model_guidance,
    nag,
    perturbation,
    sag,
    samplers,
    scfg,
    seed_papers,
    spatial_methods,
)


def node_list() -> list[type[io.ComfyNode]]:
    return [*cfg_methods.NODES, *cfg_extensions.NODES, *perturbation.NODES, *attention_methods.NODES,
            *spatial_methods.NODES, *sag.NODES, *flowmo.NODES, *nag.NODES, *scfg.NODES, *model_guidance.NODES,
            *adaptive.NODES, *feedback_guidance.NODES, *seed_papers.NODES, *annealing_guidance.NODES,
            *samplers.NODES, *guider.NODES, *digits_nodes.NODES]


class GuidanceKitExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:  # newer ComfyUI calls it; 0.3.64 calls get_node_list only
        annealing_plot.register_routes()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        annealing_plot.register_routes()  # the Annealing Guidance plot's preview route, where PromptServer runs
        return node_list()
