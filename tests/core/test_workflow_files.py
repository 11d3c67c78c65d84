"""The example workflows (workflows/) as files: they parse, pair up (UI ↔ API twin), their links are
consistent, and they are exactly what workflows/build_workflows.py generates from the specs, the Notes and the
node catalog (no ComfyUI needed; the ComfyUI tier checks them, and the catalog, against the real node schemas
and validation)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guidance_kit.workflows import build_workflows, catalog, graph
from guidance_kit.workflows.specs import WORKFLOWS as SPECS
from guidance_kit.workflows.specs import common
from guidance_kit.workflows.specs.cfg_methods import wf_apg_sdxl
from guidance_kit.workflows.specs.common import NOTES_DIR
from tests.conftest import REPO

WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
NOTE_FILES = sorted(NOTES_DIR.glob("*.md"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}


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
    written = build_workflows.build(tmp_path)
    generated = {p.relative_to(tmp_path).as_posix() for p in written}
    committed = {p.relative_to(WORKFLOWS).as_posix() for p in UI_FILES + API_FILES} | {"README.md"}
    assert generated == committed, "run: python workflows/build_workflows.py (files added or removed)"
    stale = [rel for rel in sorted(generated)
             if (tmp_path / rel).read_bytes() != (WORKFLOWS / rel).read_bytes()]
    assert not stale, f"out of date (run: python workflows/build_workflows.py): {stale}"
    assert build_workflows.stale_files(WORKFLOWS) == []


def test_build_script_runs_as_a_script_without_comfyui():
    """``python workflows/build_workflows.py --check``, as documented: exit 0, and neither ComfyUI nor torch is
    imported on the way (the committed catalog stands in for the node schemas)."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{str(WORKFLOWS / 'build_workflows.py')!r}, '--check']\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, f'--check exited with {e.code}'\n"
            "loaded = sorted(m for m in ('comfy', 'comfy_api', 'nodes', 'torch') if m in sys.modules)\n"
            "assert not loaded, f'imported {loaded}'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_build_script_rejects_a_bad_spec():
    nodes = catalog.load()
    wf = wf_apg_sdxl()
    wf.node(10).widgets["etaa"] = 0.5
    with pytest.raises(graph.SpecError, match="unknown widget"):
        graph.to_api(wf, nodes)
    wf = wf_apg_sdxl()
    wf.node(3).links["model"] = (99, "MODEL")
    with pytest.raises(graph.SpecError, match="missing node 99"):
        graph.to_ui(wf, nodes)
    wf = wf_apg_sdxl()
    wf.node(3).links["model"] = (4, "CLIP")
    with pytest.raises(graph.SpecError, match="MODEL.*linked to CLIP"):
        graph.to_ui(wf, nodes)
    wf = wf_apg_sdxl()
    del wf.node(3).links["positive"]
    with pytest.raises(graph.SpecError, match="'positive' is not connected"):
        graph.to_api(wf, nodes)
    wf = wf_apg_sdxl()
    wf.node(10).type = "GuidanceKit_NotYetInTheCatalog"
    with pytest.raises(graph.SpecError, match="not in the node catalog.*build_workflows.py --catalog"):
        graph.to_ui(wf, nodes)


# ------------------------------------------------------------------------------------------------
# the Notes (workflows/specs/notes/<workflow>.md) and the node catalog (workflows/specs/catalog.json)
# ------------------------------------------------------------------------------------------------

def test_every_workflow_has_a_note_file_and_every_note_file_a_workflow():
    names = {make().name for make in SPECS}
    assert {p.stem for p in NOTE_FILES} == names


@pytest.mark.parametrize("path", NOTE_FILES, ids=lambda p: p.stem)
def test_note_file_is_the_plain_text_of_the_note(path):
    """The Note node shows the file as it is: no escape debris (a backslash before a line break, left from a
    string literal), no leading empty line, no trailing spaces, one final newline."""
    text = path.read_text(encoding="utf-8")
    if text.startswith(common.SPEC_HEADER):  # a workflow declared in its Note file: the header is not Note text
        text = text.partition("\n")[2]
    assert "\\" not in text, f"{path.name}: the Note contains a backslash"
    assert text.split("\n", 1)[0].strip(), f"{path.name}: the Note starts with an empty line"
    assert text.endswith("\n") and not text.endswith("\n\n"), f"{path.name}: end it with exactly one newline"
    assert all(line == line.rstrip() for line in text.split("\n")), f"{path.name}: trailing spaces"
    ui = load(WORKFLOWS / f"{path.stem}.json")
    assert next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0] == text[:-1]


def test_catalog_file_is_well_formed():
    doc = json.loads(catalog.CATALOG_FILE.read_text(encoding="utf-8"))
    assert catalog.render(doc) == catalog.CATALOG_FILE.read_text(encoding="utf-8"), "not in the generator's format"
    used = {n.type for make in SPECS for n in make().nodes} - FRONTEND_ONLY
    assert used <= set(doc["nodes"])
    for name, entry in doc["nodes"].items():
        assert list(entry) == ["title", "inputs", "optional_inputs", "widgets", "defaults", "control_after_generate",
                               "outputs"], name
        assert set(entry["defaults"]) <= set(entry["widgets"]) and set(entry["control_after_generate"]) <= set(
            entry["widgets"]), name
        assert set(entry["optional_inputs"]) <= {n for n, _ in entry["inputs"]}, name


class _V1Node:
    """A V1 node class as ComfyUI core declares one (INPUT_TYPES, RETURN_TYPES)."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"model": ("MODEL",), "seed": ("INT", {"default": 0}), "steps": ("INT", {"default": 20}),
                             "cfg": ("FLOAT", {"default": 8}), "sampler_name": (["euler", "heun"],),
                             "sigmas": ("FLOAT", {"forceInput": True})},
                "optional": {"mask": ("MASK",), "mode": (["a", "b"], {"default": "b"})},
                "hidden": {"prompt": "PROMPT"}}

    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("samples",)


class _V3Node:
    """What a V3 node (comfy_api io.ComfyNode) reports: GET_NODE_INFO_V1()."""

    @classmethod
    def GET_NODE_INFO_V1(cls):  # noqa: N802
        return {"display_name": "New Method · a paper", "output": ["MODEL"], "output_name": ["MODEL"],
                "input": {"required": {"model": ("MODEL", {}), "scale": ("FLOAT", {"default": 2.0}),
                                       "seed": ("INT", {"default": 0, "control_after_generate": False})},
                          "optional": {"guide": ("MODEL", {}), "mode": ("COMBO", {"options": ["x", "y"],
                                                                                    "default": "y"})}},
                "input_order": {"required": ["model", "scale", "seed"], "optional": ["guide", "mode"]}}


def test_catalog_entries_follow_the_editor():
    """Widgets: required then optional, in schema order; sockets (and forceInput widgets) apart; declared
    defaults only (a combo without one has none); FLOAT defaults as floats; the control_after_generate rule."""
    v1 = catalog.node_entry("MySampler", _V1Node, {"MySampler": "My Sampler"})
    assert v1 == {"title": "My Sampler", "inputs": [["model", "MODEL"], ["sigmas", "FLOAT"], ["mask", "MASK"]],
                  "optional_inputs": ["mask"], "widgets": ["seed", "steps", "cfg", "sampler_name", "mode"],
                  "defaults": {"seed": 0, "steps": 20, "cfg": 8.0, "mode": "b"}, "control_after_generate": ["seed"],
                  "outputs": [["samples", "LATENT"]]}
    assert isinstance(v1["defaults"]["cfg"], float)
    assert catalog.node_entry("Untitled", _V1Node, {})["title"] == "Untitled"
    v3 = catalog.node_entry("GuidanceKit_New", _V3Node, {})
    assert v3 == {"title": "New Method · a paper", "inputs": [["model", "MODEL"], ["guide", "MODEL"]],
                  "optional_inputs": ["guide"], "widgets": ["scale", "seed", "mode"],
                  "defaults": {"scale": 2.0, "seed": 0, "mode": "y"}, "control_after_generate": [],
                  "outputs": [["MODEL", "MODEL"]]}
    doc = catalog.derive({"GuidanceKit_New": _V3Node, "MySampler": _V1Node, "Other": _V1Node}, {}, ["MySampler"])
    assert list(doc["nodes"]) == ["GuidanceKit_New", "MySampler"]  # every pack node, the other types used
    with pytest.raises(catalog.CatalogError, match="Missing"):
        catalog.derive({}, {}, ["Missing"])


def test_a_new_node_needs_only_a_spec():
    """A node type from the catalog, used by a spec with an optional socket left open: no other declaration."""
    nodes = {**catalog.load(), **catalog.from_document({"nodes": {"GuidanceKit_New": catalog.node_entry(
        "GuidanceKit_New", _V3Node, {})}})}
    wf = wf_apg_sdxl()
    wf.node(10).type, wf.node(10).widgets = "GuidanceKit_New", {"scale": 4.0}
    ui, api = graph.to_ui(wf, nodes), graph.to_api(wf, nodes)
    node = next(n for n in ui["nodes"] if n["id"] == 10)
    assert node["title"] == "New Method · a paper" and node["widgets_values"] == [4.0, 0, "y"]
    assert [(i["name"], i["link"] is None) for i in node["inputs"]] == [("model", False), ("guide", True)]
    assert api["10"]["inputs"] == {"scale": 4.0, "seed": 0, "mode": "y", "model": ["4", 0]}


# ------------------------------------------------------------------------------------------------
# workflows declared in their Note file (a header line), so a new node's example is one file
# ------------------------------------------------------------------------------------------------

HEADER = ('<!-- workflow: {"topic": "cfg_methods", "title": "TCFG, declared in its Note", "family": "SDXL", '
          '"preset": "SDXL", "guidance": [["GuidanceKit_TCFG", {}]], "positive": "a red fox", "negative": "NEG_SD", '
          '"cfg": 6.0} -->')


def test_a_workflow_declared_in_its_note_file_builds_like_a_spec_function(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "NOTES_DIR", tmp_path)
    path = tmp_path / "tcfg_declared_sdxl.md"
    path.write_text(HEADER + "\nTCFG · declared (Guidance Kit)\n\nWHAT: the Note text.\n", encoding="utf-8")
    topic, make = common.declared(path)
    declared = make()
    written = common.checkpoint_workflow("tcfg_declared_sdxl", "TCFG, declared in its Note", "SDXL", common.SDXL,
                                         [("GuidanceKit_TCFG", {})], "a red fox", common.NEG_SD, cfg=6.0)
    assert topic == "cfg_methods" and declared == written
    assert next(n for n in declared.nodes if n.type == "Note").widgets["text"] == \
        "TCFG · declared (Guidance Kit)\n\nWHAT: the Note text."


def test_a_plain_note_declares_nothing_and_a_bad_header_is_a_spec_error(tmp_path):
    plain = tmp_path / "plain.md"
    plain.write_text("A Note\n", encoding="utf-8")
    assert common.declared(plain) is None
    bad = tmp_path / "bad.md"
    bad.write_text("<!-- workflow: {not json} -->\nA Note\n", encoding="utf-8")
    with pytest.raises(graph.SpecError, match="not valid JSON"):
        common.declared(bad)
    no_topic = tmp_path / "no_topic.md"
    no_topic.write_text('<!-- workflow: {"title": "x", "guidance": []} -->\nA Note\n', encoding="utf-8")
    with pytest.raises(graph.SpecError, match="topic"):
        common.declared(no_topic)


def test_the_repository_has_a_declared_workflow():
    """At least one shipped workflow uses the one-file form (it builds byte-identical to its old spec function)."""
    assert any(common.declared(path) is not None for path in NOTE_FILES)
