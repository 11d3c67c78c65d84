"""The node catalog: every node type the workflows use, as the editor sees it, generated from the node schemas.

``specs/catalog.json`` holds, per node type, its display name, socket inputs, widgets in the editor's order
(required inputs, then optional ones, each in schema order: what ``GET_NODE_INFO_V1()`` of a V3 node and
``INPUT_TYPES()`` of a V1 node report to the frontend), the defaults the schema declares, the widgets followed by
a control_after_generate value, and the outputs. It lists every Guidance Kit node (``nodes.node_list()``) and
every other node type a spec uses. Nobody edits it: ``python workflows/build_workflows.py --catalog`` rewrites it
from the schemas of a real ComfyUI, and the ComfyUI test tier fails when it differs from them. Reading it needs
no ComfyUI, so the builder (and ``--check``) stays pure Python.

A combo without a declared default gets none here (the editor would pick its first option, which for model-file
lists depends on the machine): a spec sets it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

from .graph import PACK_PREFIX, NodeDef

CATALOG_FILE = Path(__file__).resolve().parent / "specs" / "catalog.json"
ABOUT = ("Generated from the registered node schemas by python workflows/build_workflows.py --catalog; do not "
         "edit. Per node type: display name, socket inputs, widgets in the editor's order (required, then "
         "optional), declared defaults, widgets with a control_after_generate value, outputs.")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# frontend-only nodes: in no ComfyUI registry
FRONTEND_NODES = {"Note": NodeDef("Note", widgets=("text",))}


class CatalogError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# reading (pure Python)
# ------------------------------------------------------------------------------------------------

def from_document(doc: dict) -> dict[str, NodeDef]:
    catalog = {}
    for name, e in doc["nodes"].items():
        catalog[name] = NodeDef(
            title=e["title"], inputs=tuple((n, t) for n, t in e["inputs"]), widgets=tuple(e["widgets"]),
            outputs=tuple((n, t) for n, t in e["outputs"]), defaults=dict(e["defaults"]),
            control_widgets=tuple(e["control_after_generate"]), optional_inputs=tuple(e["optional_inputs"]))
    return {**catalog, **FRONTEND_NODES}


@cache
def _load(path: Path) -> dict[str, NodeDef]:
    return from_document(json.loads(path.read_text(encoding="utf-8")))


def load(path: Path = CATALOG_FILE) -> dict[str, NodeDef]:
    """Node type → :class:`NodeDef`, from the committed catalog (a fresh dict; the file is read once)."""
    return dict(_load(Path(path).resolve()))


def reload() -> None:
    """Forget the files read (after rewriting one)."""
    _load.cache_clear()


# ------------------------------------------------------------------------------------------------
# writing: from node classes (ComfyUI's, or any with the same class attributes)
# ------------------------------------------------------------------------------------------------

def _type_name(t) -> str:
    return "COMBO" if isinstance(t, (list, tuple)) else str(getattr(t, "value", t))


def _has_control_widget(typ: str, name: str, opts: dict) -> bool:
    """The frontend adds a control_after_generate widget to an INT input with the option, or, when the option
    is absent, to one named seed / noise_seed (its legacy rule); an explicit False means none."""
    flag = opts.get("control_after_generate")
    if typ == "INT" and flag is None:
        return name in ("seed", "noise_seed")
    return bool(flag)


def _default(typ: str, value):
    if typ == "FLOAT" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # the JSON files write a FLOAT widget as 1.0, not 1
    return list(value) if isinstance(value, tuple) else value


def node_entry(name: str, cls, display_names: Mapping[str, str]) -> dict:
    """One catalog entry from a node class, as ComfyUI's server reports the node to the frontend."""
    if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 node: the server sends GET_NODE_INFO_V1()
        info = cls.GET_NODE_INFO_V1()
        title, spec, order = info["display_name"] or name, info["input"], info["input_order"]
        outputs = list(zip(info["output_name"], info["output"]))
    else:  # V1 node
        title = display_names.get(name) or name
        spec = cls.INPUT_TYPES()
        order = {section: list(entries) for section, entries in spec.items()}
        types = list(cls.RETURN_TYPES)
        outputs = list(zip(getattr(cls, "RETURN_NAMES", None) or types, types))
    inputs, optional, widgets, defaults, controls = [], [], [], {}, []
    for section in ("required", "optional"):
        for key in order.get(section, []):
            entry = spec[section][key]
            typ = _type_name(entry[0])
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if typ in WIDGET_TYPES and not opts.get("forceInput"):
                widgets.append(key)
                if "default" in opts:
                    defaults[key] = _default(typ, opts["default"])
                if _has_control_widget(typ, key, opts):
                    controls.append(key)
            else:
                inputs.append([key, typ])
                if section == "optional":
                    optional.append(key)
    return {"title": title, "inputs": inputs, "optional_inputs": optional, "widgets": widgets, "defaults": defaults,
            "control_after_generate": controls,
            "outputs": [[str(n), _type_name(t)] for n, t in outputs]}


def derive(node_classes: Mapping[str, type], display_names: Mapping[str, str], used_types: Iterable[str]) -> dict:
    """The catalog document: every Guidance Kit node in ``node_classes`` and every type in ``used_types``."""
    names = {n for n in node_classes if n.startswith(PACK_PREFIX)} | set(used_types)
    names -= set(FRONTEND_NODES)
    missing = sorted(names - set(node_classes))
    if missing:
        raise CatalogError(f"node types used by the workflows are not registered in ComfyUI: {missing}")
    return {"about": ABOUT, "nodes": {n: node_entry(n, node_classes[n], display_names) for n in sorted(names)}}


def render(doc: dict) -> str:
    """The catalog file: one line per field of a node type."""
    def one_line(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    entries = []
    for name, entry in doc["nodes"].items():
        fields = ",\n".join(f"      {one_line(k)}: {one_line(v)}" for k, v in entry.items())
        entries.append(f"    {one_line(name)}: {{\n{fields}\n    }}")
    return f'{{\n  "about": {one_line(doc["about"])},\n  "nodes": {{\n' + ",\n".join(entries) + "\n  }\n}\n"


def comfyui_node_classes(comfyui: str | Path | None = None) -> tuple[dict[str, type], dict[str, str]]:
    """(node type → class, display names) of a real ComfyUI: its core and comfy_extras nodes, and this pack's
    nodes from ``nodes.node_list()``. ComfyUI is found as the tests find it (``comfyui``, ``COMFYUI_PATH``, the
    ComfyUI this pack sits in, ``~/ComfyUI``); imported on the CPU."""
    import asyncio
    import importlib.util

    from ..digits.comfy_setup import ComfyUINotFound, import_comfyui

    try:
        path = import_comfyui(comfyui, cpu=True)
    except ComfyUINotFound as e:
        raise CatalogError(f"--catalog reads the node schemas from a real ComfyUI: {e}") from None

    def top_level(name: str, file: Path, package: bool = False):
        """ComfyUI's top-level module, by path: this pack's nodes/ must not stand in for ComfyUI's nodes.py, nor
        comfy/utils.py (nodes.py puts comfy/ on sys.path) for the utils package server.py imports."""
        current = sys.modules.get(name)
        if current is not None:
            if Path(getattr(current, "__file__", "") or "").resolve() != file.resolve():
                raise CatalogError(f"{name!r} was imported from {current.__file__}, not from ComfyUI's {file}")
            return current
        locations = [str(file.parent)] if package else None
        spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=locations)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # comfy_extras modules with missing optional dependencies (audio, ...)
    try:
        top_level("utils", path / "utils" / "__init__.py", package=True)
        nodes = top_level("nodes", path / "nodes.py")
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        logging.disable(previous)
    from ..nodes import node_list

    classes = dict(nodes.NODE_CLASS_MAPPINGS)
    for node in node_list():
        classes[node.GET_SCHEMA().node_id] = node
    return classes, dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)
