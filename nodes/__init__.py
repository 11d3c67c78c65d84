"""ComfyUI side of Guidance Kit: the engine, architecture hooks and the V3 node classes."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import adaptive, cfg_methods, guider, nag, perturbation, samplers, scfg


def node_list() -> list[type[io.ComfyNode]]:
    return [*cfg_methods.NODES, *perturbation.NODES, *nag.NODES, *scfg.NODES, *adaptive.NODES, *samplers.NODES, *guider.NODES]


class GuidanceKitExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
