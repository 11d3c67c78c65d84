"""Grid cells from running ComfyUI servers: an API-format workflow queued with overrides per row and column.

Each cell is one ``POST /prompt`` of the workflow with the global ``--set`` overrides, the row's and
the column's overrides, and the column's cfg / seed where the grid sweeps them, all fixed before the
cell is queued (so any server draws the same pixels); the images come back through
``GET /history/<id>`` and ``GET /view``. Loading, overrides and the queue call follow
``workflows/queue_workflow.py`` (the same rules and messages as the queue script); the servers, their
check and the work queue are ``fanout.py`` and ``comfy_client.py``.
"""

from __future__ import annotations

import io
import shlex
from dataclasses import dataclass

from PIL import Image

from ..workflows.queue_workflow import QueueError, apply_overrides, load_prompt, parse_assignment
from .comfy_client import CellError, ComfyClient
from .fanout import Job
from .grid import Cell, tile
from .runs import IMAGE_CAPTION, CellRun, format_caption, image_statistics


@dataclass(frozen=True)
class OverrideSet:
    """One row's or column's overrides: ``[label=NAME] NODE.INPUT=VALUE ...`` (shell quoting for spaces)."""

    label: str
    assignments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> OverrideSet:
        try:
            tokens = shlex.split(text)
        except ValueError as e:
            raise QueueError(f"compare: cannot read the override list {text!r}: {e}") from None
        label, assignments = None, []
        for token in tokens:
            name, sep, value = token.partition("=")
            if sep and name.strip().lower() == "label":
                label = value
                continue
            parse_assignment(token)  # raises with the expected syntax
            assignments.append(token)
        return cls(label or (" ".join(assignments) or "as saved"), tuple(assignments))


def set_cfg(prompt: dict, scale: float) -> list[str]:
    """Set every numeric 'cfg' widget (KSampler, KSamplerAdvanced, CFGGuider, Guidance Guider)."""
    changed = []
    for node_id, node in prompt.items():
        value = node["inputs"].get("cfg")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node["inputs"]["cfg"] = float(scale)
            changed.append(node_id)
    if not changed:
        raise QueueError("compare: the grid sweeps cfg, but no node of this workflow has a 'cfg' value "
                         "(KSampler, CFGGuider, ...); sweep another input with --column-set instead")
    return changed


class WorkflowCells:
    """The cells of a grid over one API-format workflow: a Job per cell, and its CellRun from the images."""

    def __init__(self, workflow: str, sets: list[str] = ()):
        self.prompt = load_prompt(workflow)
        apply_overrides(self.prompt, list(sets))  # fail early on a bad --set
        self.sets = list(sets)

    def build(self, overrides: list[str], scale: float | None, seed: int | None) -> dict:
        prompt, _ = apply_overrides(self.prompt, self.sets + list(overrides), seed=seed)
        if scale is not None:
            set_cfg(prompt, scale)
        return prompt

    def job(self, label: str, overrides: list[str], scale: float | None = None, seed: int | None = None) -> Job:
        return Job(label, self.build(overrides, scale, seed), fetch_images)

    @staticmethod
    def cell(images: list[Image.Image], seconds: float) -> CellRun:
        import numpy as np
        import torch

        batch = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255.0) for i in images])
        metrics = image_statistics(batch)
        picture = tile(images, columns=min(4, len(images)))
        picture.thumbnail((256, 256), Image.NEAREST)
        return CellRun(Cell(picture, format_caption(metrics, IMAGE_CAPTION)), metrics, seconds)


def _node_order(node_id: str):
    return (not node_id.isdigit(), int(node_id) if node_id.isdigit() else 0, node_id)


def fetch_images(client: ComfyClient, entry: dict) -> list[Image.Image]:
    """Every image of a history entry's outputs, in node-id order."""
    images = []
    for node_id in sorted(entry.get("outputs", {}), key=_node_order):
        for item in entry["outputs"][node_id].get("images", []):
            images.append(Image.open(io.BytesIO(client.download(item))).convert("RGB"))
    if not images:
        raise CellError("compare: the workflow ran but produced no image; add a Save Image or Preview Image node")
    return images
