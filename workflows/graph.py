"""The graph serializer: a workflow spec (:class:`Workflow`) → the editor's UI (litegraph) JSON and the API prompt.

Pure Python. What a node type looks like (title, socket inputs, widgets in the editor's order, defaults,
outputs) is not known here: it comes from the node catalog (``catalog.py``, generated from the registered node
schemas), passed in as a mapping of node type → :class:`NodeDef`. This module adds only the presentation: the
layout (columns, node sizes, the "Guidance Kit" group), colours and the JSON formatting of the files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

VIRTUAL_TYPES = ("Note", "MarkdownNote")  # frontend-only nodes: in the UI file, never in the API prompt
PACK_PREFIX = "GuidanceKit_"

MODEL, CLIP, VAE, COND, LATENT, IMAGE = "MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE"


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class NodeDef:
    """A node type as the editor sees it (one entry of the node catalog)."""
    title: str                                    # the node's display name (UI title, API _meta.title)
    inputs: tuple[tuple[str, str], ...] = ()      # socket inputs (name, type), in input order
    widgets: tuple[str, ...] = ()                 # widget inputs, in the editor's order (required, then optional)
    outputs: tuple[tuple[str, str], ...] = ()     # (name, type)
    defaults: dict = field(default_factory=dict)  # widget values used when a workflow does not set them
    control_widgets: tuple[str, ...] = ()         # widgets followed by the editor's control_after_generate value
    optional_inputs: tuple[str, ...] = ()         # socket inputs that may stay unconnected


# ------------------------------------------------------------------------------------------------
# the spec: nodes, their widget values and links
# ------------------------------------------------------------------------------------------------

@dataclass
class Node:
    id: int
    type: str
    col: int
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # input name -> (source node id, output index or output name)
    title: str | None = None
    color: tuple[str, str] | None = None
    seed_control: str = "fixed"  # the editor's control_after_generate value after seed widgets


@dataclass
class Workflow:
    name: str          # file stem: workflows/<name>.json, workflows/api/<name>.api.json
    title: str         # one line for the README
    family: str        # model family, for the README
    nodes: list[Node]

    def node(self, node_id: int) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    @property
    def note(self) -> str:
        """The text of the workflow's Note."""
        return next(n.widgets["text"] for n in self.nodes if n.type in VIRTUAL_TYPES)


# ------------------------------------------------------------------------------------------------
# presentation
# ------------------------------------------------------------------------------------------------

NOTE_COLORS = ("#432", "#653")
GROUP_COLOR = "#3f789e"
SCHEDULE_PLOT_HEIGHT = 130  # web/js/schedule_preview.js draws a plot under the widgets of schedule nodes
PACK_WIDTH, DEFAULT_WIDTH = 340, 320
# (width, height) of a node type; a height of None is computed from the slot and widget counts. Types not
# listed: PACK_WIDTH for Guidance Kit nodes, DEFAULT_WIDTH for others, computed height.
NODE_SIZES: dict[str, tuple[int, int | None]] = {
    "CheckpointLoaderSimple": (340, 98), "UNETLoader": (340, 82), "CLIPLoader": (340, 106), "VAELoader": (340, 58),
    "LoraLoaderModelOnly": (340, 82), "CLIPTextEncode": (420, 180), "FluxGuidance": (320, 58),
    "ModelSamplingSD3": (320, 58), "EmptyLatentImage": (320, 106), "EmptySD3LatentImage": (320, 106),
    "EmptyHunyuanLatentVideo": (320, 130), "KSampler": (320, 262), "KSamplerSelect": (320, 58),
    "BasicScheduler": (320, 106), "RandomNoise": (320, 82), "SamplerCustomAdvanced": (300, 126),
    "VAEDecode": (220, 46), "SaveImage": (440, 480), "SaveAnimatedWEBP": (440, 520), "PreviewImage": (320, 320),
    "GuidanceKit_DigitsModelLoader": (360, None), "Note": (440, None),
}
# pack nodes that are not guidance-chain links: drawn outside the "Guidance Kit" group
UNGROUPED = {PACK_PREFIX + t for t in ("GuidanceGuider", "SCFGMap", "DigitsModelLoader", "DigitsDecode")}


# ------------------------------------------------------------------------------------------------
# UI (litegraph) and API formats
# ------------------------------------------------------------------------------------------------

def _definition(node: Node, catalog: Mapping[str, NodeDef]) -> NodeDef:
    try:
        return catalog[node.type]
    except KeyError:
        raise SpecError(f"node {node.id}: type {node.type!r} is not in the node catalog (workflows/specs/catalog.json, "
                        f"generated from the node schemas): run python workflows/build_workflows.py --catalog "
                        f"where ComfyUI is installed") from None


def _widget_values(node: Node, catalog: Mapping[str, NodeDef]) -> list[tuple[str, object]]:
    """(input name, value) for every widget, in the node's widget order."""
    d = _definition(node, catalog)
    unknown = set(node.widgets) - set(d.widgets)
    if unknown:
        raise SpecError(f"node {node.id} ({node.type}): unknown widget(s) {sorted(unknown)}; it has {list(d.widgets)}")
    values = []
    for name in d.widgets:
        if name in node.widgets:
            values.append((name, node.widgets[name]))
        elif name in d.defaults:
            values.append((name, d.defaults[name]))
        else:
            raise SpecError(f"node {node.id} ({node.type}): no value for widget {name!r} (it has no default)")
    return values


def _output_index(source: Node, output: int | str, catalog: Mapping[str, NodeDef]) -> int:
    outputs = _definition(source, catalog).outputs
    if isinstance(output, int):
        if not 0 <= output < len(outputs):
            raise SpecError(f"node {source.id} ({source.type}) has no output {output}")
        return output
    names = [name for name, _ in outputs]
    if output not in names:
        raise SpecError(f"node {source.id} ({source.type}) has no output {output!r}; it has {names}")
    return names.index(output)


def _links(wf: Workflow, catalog: Mapping[str, NodeDef]) -> list[tuple[int, int, int, int, int, str]]:
    """[link id, source id, source slot, target id, target slot, type] in the order of the nodes' inputs."""
    by_id = {n.id: n for n in wf.nodes}
    if len(by_id) != len(wf.nodes):
        raise SpecError(f"{wf.name}: duplicate node ids")
    links = []
    for node in wf.nodes:
        d = _definition(node, catalog)
        input_names = [name for name, _ in d.inputs]
        unknown = set(node.links) - set(input_names)
        if unknown:
            raise SpecError(f"{wf.name}: node {node.id} ({node.type}) has no input(s) {sorted(unknown)}")
        for slot, (name, typ) in enumerate(d.inputs):
            if name not in node.links:
                if name in d.optional_inputs:
                    continue
                raise SpecError(f"{wf.name}: node {node.id} ({node.type}): input {name!r} is not connected")
            src_id, output = node.links[name]
            if src_id not in by_id:
                raise SpecError(f"{wf.name}: node {node.id} input {name!r} links to missing node {src_id}")
            src = by_id[src_id]
            src_slot = _output_index(src, output, catalog)
            src_type = _definition(src, catalog).outputs[src_slot][1]
            if src_type != typ:
                raise SpecError(f"{wf.name}: node {node.id} input {name!r} ({typ}) linked to {src_type} output")
            links.append((len(links) + 1, src_id, src_slot, node.id, slot, typ))
    return links


def _execution_order(wf: Workflow, links) -> dict[int, int]:
    """The editor's 'order': a topological order (sources first, ties by id)."""
    deps = {n.id: {src for _, src, _, dst, _, _ in links if dst == n.id} for n in wf.nodes}
    order, done = {}, set()
    while len(done) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        if not ready:
            raise SpecError(f"{wf.name}: the graph has a cycle")
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


def _size(node: Node, catalog: Mapping[str, NodeDef]) -> list[int]:
    d = _definition(node, catalog)
    width, height = NODE_SIZES.get(node.type, (PACK_WIDTH if node.type.startswith(PACK_PREFIX) else DEFAULT_WIDTH,
                                               None))
    if node.type == "Note":
        text = node.widgets["text"]
        lines = sum(max(1, math.ceil(len(par) / 64)) for par in text.split("\n"))
        return [width, 40 + 14 * lines]
    if height is not None:
        return [width, height]
    width = max(width, math.ceil(7.6 * len(d.title)) + 20)  # the editor widens a node to fit its title
    height = 30 + 24 * max(len(d.inputs), len(d.outputs), 1) + 26 * len(d.widgets)
    if node.type.startswith(PACK_PREFIX) and {"schedule", "start_percent"} & set(d.widgets):
        height += SCHEDULE_PLOT_HEIGHT
    return [width, height]


def _in_group(node: Node) -> bool:
    return node.type.startswith(PACK_PREFIX) and node.type not in UNGROUPED


def _layout(wf: Workflow, catalog: Mapping[str, NodeDef]) -> dict[int, tuple[list[int], list[int]]]:
    """Left-to-right columns; nodes stacked top to bottom in spec order; room for the group title."""
    sizes = {n.id: _size(n, catalog) for n in wf.nodes}
    columns = sorted({n.col for n in wf.nodes})
    widths = {c: max(sizes[n.id][0] for n in wf.nodes if n.col == c) for c in columns}
    x, xs = 40, {}
    for c in columns:
        xs[c] = x
        x += widths[c] + 80
    out = {}
    for c in columns:
        y, previous_in_group = 80, None
        for n in (n for n in wf.nodes if n.col == c):
            in_group = _in_group(n)
            if in_group and not previous_in_group:
                y += 70  # the group's title bar
            out[n.id] = ([xs[c], y], sizes[n.id])
            y += sizes[n.id][1] + 70
            previous_in_group = in_group
    return out


def _groups(wf: Workflow, layout) -> list[dict]:
    members = [n for n in wf.nodes if _in_group(n)]
    if not members:
        return []
    left = min(layout[n.id][0][0] for n in members) - 20
    top = min(layout[n.id][0][1] for n in members) - 30 - 60
    right = max(layout[n.id][0][0] + layout[n.id][1][0] for n in members) + 20
    bottom = max(layout[n.id][0][1] + layout[n.id][1][1] for n in members) + 20
    return [{"id": 1, "title": "Guidance Kit", "bounding": [left, top, right - left, bottom - top],
             "color": GROUP_COLOR, "font_size": 24, "flags": {}}]


def to_ui(wf: Workflow, catalog: Mapping[str, NodeDef]) -> dict:
    """The workflow as the editor saves it (litegraph JSON, version 0.4)."""
    links = _links(wf, catalog)
    order = _execution_order(wf, links)
    layout = _layout(wf, catalog)
    ui_nodes = []
    for node in sorted(wf.nodes, key=lambda n: n.id):
        d = _definition(node, catalog)
        pos, size = layout[node.id]
        inputs = []
        for slot, (name, typ) in enumerate(d.inputs):
            link = next((lk for lk in links if lk[3] == node.id and lk[4] == slot), None)
            inputs.append({"name": name, "type": typ, "link": link[0] if link else None})
        outputs = []
        for slot, (name, typ) in enumerate(d.outputs):
            out_links = [lk[0] for lk in links if lk[1] == node.id and lk[2] == slot]
            outputs.append({"name": name, "type": typ, "links": out_links or None, "slot_index": slot})
        widgets_values = []
        for name, value in _widget_values(node, catalog):
            widgets_values.append(value)
            if name in d.control_widgets:
                widgets_values.append(node.seed_control)
        entry = {"id": node.id, "type": node.type, "pos": pos, "size": size, "flags": {}, "order": order[node.id],
                 "mode": 0, "inputs": inputs, "outputs": outputs}
        if node.type in VIRTUAL_TYPES:
            entry["properties"] = {}
        else:
            entry["title"] = node.title or d.title
            entry["properties"] = {"Node name for S&R": node.type}
        entry["widgets_values"] = widgets_values
        color = NOTE_COLORS if node.type in VIRTUAL_TYPES else node.color
        if color:
            entry["color"], entry["bgcolor"] = color
        ui_nodes.append(entry)
    return {
        "last_node_id": max(n.id for n in wf.nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": [list(lk) for lk in links],
        "groups": _groups(wf, layout),
        "config": {},
        "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}},
        "version": 0.4,
    }


def to_api(wf: Workflow, catalog: Mapping[str, NodeDef]) -> dict:
    """The workflow as ``POST /prompt`` takes it (what the editor's Export (API) writes)."""
    _links(wf, catalog)  # the same checks as for the UI file
    by_id = {n.id: n for n in wf.nodes}
    prompt = {}
    for node in sorted(wf.nodes, key=lambda n: n.id):
        if node.type in VIRTUAL_TYPES:
            continue
        d = _definition(node, catalog)
        inputs: dict = dict(_widget_values(node, catalog))
        for name, _ in d.inputs:
            if name not in node.links:  # an optional input left unconnected
                continue
            src_id, output = node.links[name]
            inputs[name] = [str(src_id), _output_index(by_id[src_id], output, catalog)]
        prompt[str(node.id)] = {"inputs": inputs, "class_type": node.type, "_meta": {"title": node.title or d.title}}
    return prompt


def _dump(obj, indent: int) -> str:
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dump(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) and v for v in obj):
        return "[\n" + ",\n".join(f"{inner}{_dump(v, indent + 2)}" for v in obj) + f"\n{pad}]"
    return json.dumps(obj, ensure_ascii=False)  # scalars and flat lists on one line


def dumps(obj) -> str:
    """JSON with 2-space indentation and flat lists (positions, links, widget values) on one line."""
    return _dump(obj, 0) + "\n"
