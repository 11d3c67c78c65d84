"""The example workflows (workflows/) as files: they parse, pair up (UI ↔ API twin), their links are
consistent, and they are exactly what workflows/build_workflows.py generates (no ComfyUI needed; the
ComfyUI tier checks them against the real node schemas and validation)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def _load_build_script():
    name = "guidance_kit_workflows_build_workflows"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, WORKFLOWS / "build_workflows.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def twin_of(ui_path: Path) -> Path:
    return WORKFLOWS / "api" / f"{ui_path.stem}.api.json"


def test_there_are_workflows():
    assert len(UI_FILES) >= 8
    assert all(p.name.endswith(".api.json") for p in API_FILES)


@pytest.mark.parametrize("path", UI_FILES + API_FILES, ids=lambda p: p.relative_to(WORKFLOWS).as_posix())
def test_every_workflow_file_parses(path):
    data = load(path)
    assert isinstance(data, dict) and data
    assert path.read_text(encoding="utf-8").endswith("}\n")


def test_every_ui_workflow_has_an_api_twin_and_vice_versa():
    ui_stems = {p.stem for p in UI_FILES}
    api_stems = {p.name[:-len(".api.json")] for p in API_FILES}
    assert ui_stems - api_stems == set(), "UI workflows without workflows/api/<name>.api.json"
    assert api_stems - ui_stems == set(), "API workflows without a UI workflow"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_structure_and_links(path):
    ui = load(path)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in ui, f"{path.name}: no {key!r}"
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    assert ui["last_node_id"] >= max(nodes)
    links = {lk[0]: lk for lk in ui["links"]}
    assert len(links) == len(ui["links"]), "duplicate link ids"
    assert not links or ui["last_link_id"] >= max(links)

    for node in ui["nodes"]:
        for key in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "properties", "mode"):
            assert key in node, f"{path.name}: node {node.get('id')} has no {key!r}"
        assert node["mode"] == 0
        if node["type"] not in FRONTEND_ONLY:
            assert node["properties"]["Node name for S&R"] == node["type"]
    # every link joins an existing output to an existing input, and both ends list it
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        assert src in nodes and dst in nodes, f"link {link_id} joins missing nodes"
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in (out["links"] or []), f"link {link_id} is not listed by node {src} output {src_slot}"
        assert inp["link"] == link_id, f"link {link_id} is not the link of node {dst} input {dst_slot}"
        assert out["type"] == inp["type"] == typ
    # every link a node mentions exists
    for node in ui["nodes"]:
        for inp in node["inputs"]:
            assert inp["link"] is None or inp["link"] in links, f"node {node['id']} refers to missing link"
        for out in node["outputs"]:
            for link_id in out["links"] or []:
                assert link_id in links and links[link_id][1] == node["id"]
    # the editor's 'order' is a topological order
    order = {n["id"]: n["order"] for n in ui["nodes"]}
    assert sorted(order.values()) == list(range(len(order)))
    assert all(order[src] < order[dst] for _, src, _, dst, _, _ in ui["links"])
    # a Note explains the settings (plain text: no escape debris such as a backslash before a line break);
    # the layout has no overlapping nodes
    assert [n["type"] for n in ui["nodes"]].count("Note") == 1
    note_text = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "\\" not in note_text, f"{path.name}: the Note contains a backslash"
    assert note_text.split("\n", 1)[0].strip(), f"{path.name}: the Note starts with an empty line"
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in ui["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), f"{path.name}: overlap"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_matches_the_ui_graph(path):
    """The same nodes and links (the ComfyUI tier also checks the widget names against the node schemas)."""
    ui, api = load(path), load(twin_of(path))
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert set(api) == set(ui_nodes)
    expected_links = {(str(dst), ui_nodes[str(dst)]["inputs"][dst_slot]["name"], str(src), src_slot)
                      for _, src, src_slot, dst, dst_slot, _ in ui["links"]}
    api_links = set()
    for node_id, node in api.items():
        assert node["class_type"] == ui_nodes[node_id]["type"]
        assert node["_meta"]["title"] == ui_nodes[node_id].get("title", node["class_type"])
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                src, slot = value
                assert isinstance(src, str) and src in api, f"{node_id}.{name} links to missing node {src}"
                assert isinstance(slot, int) and 0 <= slot < len(ui_nodes[src]["outputs"])
                api_links.add((node_id, name, src, slot))
        widget_values = [v for v in node["inputs"].values() if not isinstance(v, list)]
        ui_values = [v for v in ui_nodes[node_id]["widgets_values"] if v not in ("fixed", "randomize")]
        assert widget_values == ui_values, f"node {node_id}: widget values differ"
    assert api_links == expected_links


def test_build_script_output_is_identical_to_the_committed_files(tmp_path):
    build = _load_build_script()
    written = build.build(tmp_path)
    generated = {p.relative_to(tmp_path).as_posix() for p in written}
    committed = {p.relative_to(WORKFLOWS).as_posix() for p in UI_FILES + API_FILES} | {"README.md"}
    assert generated == committed, "run: python workflows/build_workflows.py (files added or removed)"
    stale = [rel for rel in sorted(generated)
             if (tmp_path / rel).read_bytes() != (WORKFLOWS / rel).read_bytes()]
    assert not stale, f"out of date (run: python workflows/build_workflows.py): {stale}"
    assert build.stale_files(WORKFLOWS) == []


def test_build_script_rejects_a_bad_spec():
    build = _load_build_script()
    wf = build.wf_apg_sdxl()
    wf.node(10).widgets["etaa"] = 0.5
    with pytest.raises(build.SpecError, match="unknown widget"):
        build.to_api(wf)
    wf = build.wf_apg_sdxl()
    wf.node(3).links["model"] = (99, "MODEL")
    with pytest.raises(build.SpecError, match="missing node 99"):
        build.to_ui(wf)
    wf = build.wf_apg_sdxl()
    wf.node(3).links["model"] = (4, "CLIP")
    with pytest.raises(build.SpecError, match="MODEL.*linked to CLIP"):
        build.to_ui(wf)
