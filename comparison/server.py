"""Grid cells from a running ComfyUI: an API-format workflow queued with overrides per row and column.

Each cell is one ``POST /prompt`` of the workflow with the global ``--set`` overrides, the row's and
the column's overrides, and the column's cfg / seed where the grid sweeps them; the images come back
through ``GET /history/<id>`` and ``GET /view``. Loading, overrides and the queue call are
``workflows/queue_workflow.py``'s (the same rules and messages as the queue script).
"""

from __future__ import annotations

import io
import json
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

from PIL import Image

from ..workflows.queue_workflow import (
    EXIT_UNREACHABLE,
    QueueError,
    apply_overrides,
    load_prompt,
    parse_assignment,
    post_prompt,
)
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


def _get_json(url: str, timeout: float):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def check_server(server: str, timeout: float = 10.0) -> dict:
    """GET /system_stats; QueueError (exit code 3) with a hint when nothing answers there."""
    try:
        return _get_json(server.rstrip("/") + "/system_stats", timeout)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise QueueError(f"compare: cannot reach ComfyUI at {server} ({reason}). Is the server running? Start it "
                         f"with 'python main.py' in your ComfyUI folder, or pass --server URL.",
                         EXIT_UNREACHABLE) from None
    except json.JSONDecodeError:
        raise QueueError(f"compare: {server} answered, but not as a ComfyUI server (no JSON at /system_stats)",
                         EXIT_UNREACHABLE) from None


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


class ServerRunner:
    def __init__(self, server: str, workflow: str, sets: list[str] = (), timeout: float = 600.0):
        self.server = server.rstrip("/")
        self.prompt = load_prompt(workflow)
        apply_overrides(self.prompt, list(sets))  # fail early on a bad --set
        self.sets = list(sets)
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        check_server(self.server)

    def build(self, overrides: list[str], scale: float | None, seed: int | None) -> dict:
        prompt, _ = apply_overrides(self.prompt, self.sets + list(overrides), seed=seed)
        if scale is not None:
            set_cfg(prompt, scale)
        return prompt

    def run(self, overrides: list[str], scale: float | None = None, seed: int | None = None) -> CellRun:
        start = time.perf_counter()
        prompt = self.build(overrides, scale, seed)
        answer = post_prompt(self.server, prompt, self.client_id)
        prompt_id = answer.get("prompt_id")
        if not prompt_id:
            raise QueueError(f"compare: unexpected answer from {self.server}: {json.dumps(answer)}")
        images = self.fetch_images(self.wait(prompt_id))
        seconds = time.perf_counter() - start
        import numpy as np
        import torch

        batch = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255.0) for i in images])
        metrics = image_statistics(batch)
        picture = tile(images, columns=min(4, len(images)))
        picture.thumbnail((256, 256), Image.NEAREST)
        return CellRun(Cell(picture, format_caption(metrics, IMAGE_CAPTION)), metrics, seconds)

    def wait(self, prompt_id: str) -> dict:
        """The history entry of ``prompt_id`` once it has run; QueueError with ComfyUI's message if it failed."""
        deadline = time.monotonic() + self.timeout
        url = f"{self.server}/history/{urllib.parse.quote(prompt_id)}"
        while time.monotonic() < deadline:
            try:
                history = _get_json(url, 30.0)
            except (urllib.error.URLError, OSError) as e:
                raise QueueError(f"compare: lost ComfyUI at {self.server} while waiting ({getattr(e, 'reason', e)})",
                                 EXIT_UNREACHABLE) from None
            entry = history.get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    raise QueueError(f"compare: ComfyUI failed to run the workflow: {_execution_error(status)}")
                if status.get("completed", True):
                    return entry
            time.sleep(0.2)
        raise QueueError(f"compare: the workflow did not finish within {self.timeout:.0f} s on {self.server} "
                         f"(raise --timeout, or check the server's console)")

    def fetch_images(self, entry: dict) -> list[Image.Image]:
        images = []
        for node_id in sorted(entry.get("outputs", {}), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0,
                                                                        k)):
            for item in entry["outputs"][node_id].get("images", []):
                query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                                "type": item.get("type", "output")})
                try:
                    with urllib.request.urlopen(f"{self.server}/view?{query}", timeout=60) as response:
                        images.append(Image.open(io.BytesIO(response.read())).convert("RGB"))
                except (urllib.error.URLError, OSError) as e:
                    raise QueueError(f"compare: could not download {item['filename']} from {self.server}: "
                                     f"{getattr(e, 'reason', e)}") from None
        if not images:
            raise QueueError("compare: the workflow ran but produced no image; add a Save Image or Preview Image node")
        return images


def _execution_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type', 'error')}: "
                    f"{data.get('exception_message', '').strip()}")
    return json.dumps(status)[:500]
