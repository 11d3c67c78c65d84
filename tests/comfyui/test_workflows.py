"""The example workflows (workflows/) against a real ComfyUI: every UI workflow converts, with the node
schemas ComfyUI reports, to exactly its API twin; ComfyUI's own prompt validation accepts every one (with
placeholder model files); every Guidance Kit node is shown in a workflow; broken workflows are caught; and
queue_workflow.py's overrides and server handling work."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import asyncio
import copy
import importlib.util
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from guidance_kit.workflows import build_workflows, catalog
from tests.conftest import COMFYUI_PATH, REPO

WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
PACK_PREFIX = "GuidanceKit_"

# Registered Guidance Kit nodes that no example workflow shows yet. Keep this empty: a node listed here that a
# workflow now shows, or that no longer exists, fails test_every_pack_node_is_in_a_workflow.
PENDING_WORKFLOWS: set[str] = set()

FRONTEND_ONLY = {"Note", "MarkdownNote"}  # the editor's virtual nodes: never sent to /prompt
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# loader widget → ComfyUI model folder, for the placeholder model files
MODEL_FOLDERS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "clip_name": "text_encoders",
                 "vae_name": "vae", "lora_name": "loras"}


def _load_script(name: str):
    """A script of workflows/ as a module (dataclasses need it in sys.modules)."""
    module_name = f"guidance_kit_workflows_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, WORKFLOWS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


queue = _load_script("queue_workflow")


def api_twin(ui_path: Path) -> Path:
    return ui_path.parent / "api" / f"{ui_path.stem}.api.json"


# ------------------------------------------------------------------------------------------------
# ComfyUI with every node registered and placeholder model files
# ------------------------------------------------------------------------------------------------

def _comfyui_utils_package() -> None:
    """server.py (imported by comfy_extras/nodes_images.py: SaveAnimatedWEBP, ...) needs ComfyUI's top-level
    ``utils`` package. main.py imports it before nodes.py puts ComfyUI/comfy first on sys.path, where
    comfy/utils.py would shadow it; do the same here."""
    init = COMFYUI_PATH / "utils" / "__init__.py"
    current = sys.modules.get("utils")
    if current is not None and Path(getattr(current, "__file__", "") or "").resolve() == init.resolve():
        return
    spec = importlib.util.spec_from_file_location("utils", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["utils"] = module
    spec.loader.exec_module(module)


def _workflow_class_types() -> set[str]:
    types = set()
    for path in UI_FILES:
        types |= {n["type"] for n in json.loads(path.read_text(encoding="utf-8"))["nodes"]}
    return types - FRONTEND_ONLY


def _register_nodes(nodes) -> None:
    """Core and comfy_extras nodes as ComfyUI's startup loads them, and this pack as test_pack_loading does."""
    core = {t for t in _workflow_class_types() if not t.startswith(PACK_PREFIX)}
    if core - set(nodes.NODE_CLASS_MAPPINGS):
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not any(k.startswith(PACK_PREFIX) for k in nodes.NODE_CLASS_MAPPINGS):
        assert asyncio.run(nodes.load_custom_node(str(REPO)))
    missing = _workflow_class_types() - set(nodes.NODE_CLASS_MAPPINGS)
    assert not missing, f"node types used by the workflows are not registered in ComfyUI: {sorted(missing)}"


def _placeholder_models() -> dict[str, set[str]]:
    """Model folder → file names the workflows' loaders name."""
    wanted: dict[str, set[str]] = {}
    for path in sorted((WORKFLOWS / "api").glob("*.api.json")):
        for node in json.loads(path.read_text(encoding="utf-8")).values():
            for name, value in node["inputs"].items():
                if name in MODEL_FOLDERS and isinstance(value, str):
                    wanted.setdefault(MODEL_FOLDERS[name], set()).add(value)
                elif isinstance(value, str) and value.endswith((".safetensors", ".ckpt", ".pt", ".gguf")):
                    raise AssertionError(f"{path.name}: {node['class_type']}.{name} names a model file; add "
                                         f"{name!r} to MODEL_FOLDERS")
    return wanted


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    _comfyui_utils_package()
    import execution
    import folder_paths
    import nodes

    registries = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "EXTENSION_WEB_DIRS")
    saved = {name: dict(getattr(nodes, name)) for name in registries}  # restored afterwards, as found
    _register_nodes(nodes)
    root = tmp_path_factory.mktemp("models")
    added = []
    for folder, names in _placeholder_models().items():
        directory = root / folder
        directory.mkdir()
        for name in names:
            (directory / name).write_bytes(b"")  # validation only lists the files
        folder_paths.add_model_folder_path(folder, str(directory))
        added.append((folder, str(directory)))
    folder_paths.filename_list_cache.clear()
    try:
        yield SimpleNamespace(nodes=nodes, execution=execution)
    finally:
        for folder, directory in added:
            folder_paths.folder_names_and_paths[folder][0].remove(directory)
        folder_paths.filename_list_cache.clear()
        for name, content in saved.items():
            getattr(nodes, name).clear()
            getattr(nodes, name).update(content)


def validate(comfy, prompt: dict):
    """ComfyUI's /prompt validation: (valid, error, good outputs, node errors)."""
    return asyncio.run(comfy.execution.validate_prompt("guidance-kit-test", copy.deepcopy(prompt), None))


def error_types(result) -> set[str]:
    _, error, _, node_errors = result
    types = {e["type"] for info in node_errors.values() for e in info["errors"]}
    return types | ({error["type"]} if isinstance(error, dict) and error.get("type") else set())


# ------------------------------------------------------------------------------------------------
# our UI → API converter, from the node schemas ComfyUI reports (INPUT_TYPES)
# ------------------------------------------------------------------------------------------------

class WorkflowError(AssertionError):
    pass


def _type_name(t) -> str | list:
    return t if isinstance(t, list) else str(getattr(t, "value", t))


def widget_inputs(node_class) -> list[tuple[str, str | list, dict]]:
    """(name, type, options) of the inputs the editor shows as widgets, in its order (required, then optional)."""
    spec = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            typ = _type_name(entry[0])
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput"):
                out.append((name, typ, opts))
    return out


def has_control_widget(typ, name: str, opts: dict) -> bool:
    """The editor adds a 'control after generate' widget (its value follows in widgets_values) to an INT input
    with control_after_generate, or, when the option is absent, one named seed / noise_seed (the frontend's
    legacy rule); an explicit False means none."""
    if typ == "INT":
        flag = opts.get("control_after_generate")
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return bool(opts.get("control_after_generate"))


def check_widget_value(where: str, name: str, typ, opts: dict, value) -> None:
    """What the editor would refuse or silently change on load (ComfyUI skips these checks for nodes with a
    validate_inputs(**kwargs), and does not check V3 combos)."""
    options = typ if isinstance(typ, list) else opts.get("options") if typ == "COMBO" else None
    if options is not None and value not in options:
        raise WorkflowError(f"{where}: {name} = {value!r} is not one of {options[:12]}")
    if typ == "INT" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise WorkflowError(f"{where}: {name} = {value!r} is not an INT")
    if typ == "FLOAT" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise WorkflowError(f"{where}: {name} = {value!r} is not a FLOAT")
    if typ == "BOOLEAN" and not isinstance(value, bool):
        raise WorkflowError(f"{where}: {name} = {value!r} is not a BOOLEAN")
    if typ == "STRING" and not isinstance(value, str):
        raise WorkflowError(f"{where}: {name} = {value!r} is not a STRING")
    if typ in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            raise WorkflowError(f"{where}: {name} = {value} is outside [{opts.get('min')}, {opts.get('max')}]")


def ui_to_api(ui: dict, node_classes: dict, display_names: dict) -> dict:
    """The API prompt the editor would send for a UI workflow (its graphToPrompt), checking it on the way."""
    links = {lk[0]: lk for lk in ui["links"]}
    ids = {n["id"] for n in ui["nodes"]}
    prompt = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        kind = node["type"]
        where = f"node {node['id']} ({kind})"
        if kind in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            raise WorkflowError(f"{where}: muted or bypassed nodes are not expected in the examples")
        if kind not in node_classes:
            raise WorkflowError(f"{where}: node type {kind!r} is not registered in ComfyUI")
        cls = node_classes[kind]
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, typ, opts in widget_inputs(cls):
            if not values:
                raise WorkflowError(f"{where}: widgets_values has no value for {name!r} "
                                    f"(the node's widgets: {[w[0] for w in widget_inputs(cls)]})")
            value = values.pop(0)
            check_widget_value(where, name, typ, opts, value)
            inputs[name] = value
            if has_control_widget(typ, name, opts):
                if not values or values[0] not in CONTROL_VALUES:
                    raise WorkflowError(f"{where}: {name} must be followed by its control_after_generate value "
                                        f"({', '.join(sorted(CONTROL_VALUES))})")
                values.pop(0)
        if values:
            raise WorkflowError(f"{where}: {len(values)} widget value(s) more than the node's widgets "
                                f"{[w[0] for w in widget_inputs(cls)]}: {values}")
        schema = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
        for slot, socket_input in enumerate(node.get("inputs", [])):
            name = socket_input["name"]
            if name not in schema:
                raise WorkflowError(f"{where}: input {name!r} does not exist (inputs: {list(schema)})")
            if socket_input.get("link") is None:
                continue
            link = links.get(socket_input["link"])
            if link is None:
                raise WorkflowError(f"{where}: input {name!r} refers to missing link {socket_input['link']}")
            _, src, src_slot, dst, dst_slot, link_type = link
            if (dst, dst_slot) != (node["id"], slot) or src not in ids:
                raise WorkflowError(f"{where}: link {link[0]} does not connect node {src} to this input")
            expected = _type_name(schema[name][0])
            if link_type != expected or socket_input["type"] != expected:
                raise WorkflowError(f"{where}: input {name!r} is {expected}, the link carries {link_type}")
            inputs[name] = [str(src), src_slot]
        outputs = [str(getattr(t, "value", t)) for t in cls.RETURN_TYPES]
        names = list(getattr(cls, "RETURN_NAMES", None) or outputs)
        for slot, output in enumerate(node.get("outputs", [])):
            if slot >= len(outputs) or output["type"] != outputs[slot] or output["name"] != names[slot]:
                raise WorkflowError(f"{where}: output {slot} {output['name']}:{output['type']} does not match "
                                    f"the node's outputs {list(zip(names, outputs))}")
        title = node.get("title") or display_names.get(kind) or kind
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    for link in ui["links"]:
        src = next((n for n in ui["nodes"] if n["id"] == link[1]), None)
        if src is None or link[0] not in (src["outputs"][link[2]].get("links") or []):
            raise WorkflowError(f"link {link[0]}: its source node {link[1]} output {link[2]} does not list it")
    return prompt


def convert(comfy, ui: dict) -> dict:
    return ui_to_api(ui, comfy.nodes.NODE_CLASS_MAPPINGS, comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# every shipped workflow
# ------------------------------------------------------------------------------------------------

def test_there_are_workflows():
    assert len(UI_FILES) >= 8
    assert all(api_twin(p).is_file() for p in UI_FILES)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_converts_to_its_api_twin(comfy, path):
    converted = convert(comfy, load_json(path))
    assert converted == load_json(api_twin(path)), f"{api_twin(path).name} differs from {path.name} as converted"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_comfyui_validates_the_workflow(comfy, path):
    prompt = convert(comfy, load_json(path))
    valid, error, good_outputs, node_errors = validate(comfy, prompt)
    assert valid is True and not node_errors, f"{path.name}: {error} {json.dumps(node_errors, default=str)[:2000]}"
    outputs = {i for i, n in prompt.items() if getattr(comfy.nodes.NODE_CLASS_MAPPINGS[n["class_type"]],
                                                       "OUTPUT_NODE", False)}
    assert set(good_outputs) == outputs and outputs
    # every node feeds an output, so validation saw all of them
    reached, stack = set(), list(outputs)
    while stack:
        i = stack.pop()
        if i not in reached:
            reached.add(i)
            stack += [v[0] for v in prompt[i]["inputs"].values() if isinstance(v, list)]
    assert reached == set(prompt), f"{path.name}: nodes {set(prompt) - reached} feed no output"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_workflow_has_an_explaining_note(path):
    notes = [n for n in load_json(path)["nodes"] if n["type"] in FRONTEND_ONLY]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert len(text) > 500
    for section in ("WHAT", "CHANGE FIRST", "OTHER"):
        assert section in text, f"{path.name}: the Note has no {section} part"


def test_every_pack_node_is_in_a_workflow(comfy):
    registered = {k for k in comfy.nodes.NODE_CLASS_MAPPINGS if k.startswith(PACK_PREFIX)}
    shown = set()
    for path in UI_FILES:
        shown |= {n["type"] for n in load_json(path)["nodes"]}
    missing = registered - shown - PENDING_WORKFLOWS
    assert not missing, (f"no example workflow shows {sorted(missing)}: add a spec to workflows/specs/ and its Note "
                         f"to workflows/specs/notes/ (see workflows/build_workflows.py)")
    stale = PENDING_WORKFLOWS & shown | PENDING_WORKFLOWS - registered
    assert not stale, f"remove {sorted(stale)} from PENDING_WORKFLOWS (now shown in a workflow, or gone)"


# ------------------------------------------------------------------------------------------------
# the node catalog the builder reads instead of ComfyUI (workflows/specs/catalog.json)
# ------------------------------------------------------------------------------------------------

def test_node_catalog_is_what_the_node_schemas_say(comfy):
    """Every Guidance Kit node and every node type a spec uses, as the registered schemas describe them."""
    expected = build_workflows.catalog_text(comfy.nodes.NODE_CLASS_MAPPINGS, comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS)
    assert catalog.CATALOG_FILE.read_text(encoding="utf-8") == expected, (
        "workflows/specs/catalog.json differs from the node schemas: run python workflows/build_workflows.py --catalog")


def test_node_catalog_agrees_with_this_modules_reading_of_the_schemas(comfy):
    """Widget order, control widgets, sockets, outputs and titles as ui_to_api above reads them (INPUT_TYPES,
    RETURN_TYPES / RETURN_NAMES, display names): two readings of the schemas, one result."""
    classes, display_names = comfy.nodes.NODE_CLASS_MAPPINGS, comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS
    for name, d in catalog.load().items():
        if name in FRONTEND_ONLY:
            continue
        cls = classes[name]
        widgets = widget_inputs(cls)
        assert d.widgets == tuple(w[0] for w in widgets), name
        assert d.control_widgets == tuple(n for n, typ, opts in widgets if has_control_widget(typ, n, opts)), name
        spec = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
        assert [n for n, _ in d.inputs] == [n for n in spec if n not in d.widgets], name
        assert set(d.optional_inputs) == {n for n, _ in d.inputs} & set(cls.INPUT_TYPES().get("optional", {})), name
        for widget, value in d.defaults.items():
            assert spec[widget][1]["default"] == value, (name, widget)
        outputs = [str(getattr(t, "value", t)) for t in cls.RETURN_TYPES]
        names = list(getattr(cls, "RETURN_NAMES", None) or outputs)
        assert d.outputs == tuple(zip(names, outputs)), name
        assert d.title == (display_names.get(name) or name), name


# ------------------------------------------------------------------------------------------------
# the checks can fail
# ------------------------------------------------------------------------------------------------

def _prompt(comfy, stem: str) -> dict:
    return convert(comfy, load_json(WORKFLOWS / f"{stem}.json"))


def test_validation_rejects_a_renamed_widget_input(comfy):
    prompt = _prompt(comfy, "apg_sdxl")
    assert validate(comfy, prompt)[0] is True
    inputs = prompt["10"]["inputs"]
    inputs["eta_renamed"] = inputs.pop("eta")
    valid, _, _, node_errors = validate(comfy, prompt)
    assert valid is False
    assert any(e["type"] == "required_input_missing" and e["details"] == "eta" for e in node_errors["10"]["errors"])


@pytest.mark.parametrize("node_id, name, value, expected", [
    ("3", "sampler_name", "euler_but_faster", "value_not_in_list"),   # core combo
    ("4", "ckpt_name", "not_downloaded.safetensors", "value_not_in_list"),  # model file
    ("3", "steps", 0, "value_smaller_than_min"),
    ("10", "schedule", "wobbly", "custom_validation_failed"),  # the pack's own validate_inputs
    ("10", "sigma_low", 9.0, "custom_validation_failed"),  # empty window: sigma_low above sigma_high
])
def test_validation_rejects_a_wrong_value(comfy, node_id, name, value, expected):
    prompt = _prompt(comfy, "cfg_schedule_sdxl")
    assert name in prompt[node_id]["inputs"]
    prompt[node_id]["inputs"][name] = value
    result = validate(comfy, prompt)
    assert result[0] is False
    assert expected in error_types(result), error_types(result)


def test_validation_rejects_an_unknown_node_type(comfy):
    prompt = _prompt(comfy, "fdg_sdxl")
    prompt["10"]["class_type"] = "GuidanceKit_FDG_Renamed"
    valid, error, _, _ = validate(comfy, prompt)
    assert valid is False and "does not exist" in error["message"]


def _ui(stem: str) -> dict:
    return load_json(WORKFLOWS / f"{stem}.json")


def _ui_node(ui: dict, node_id: int) -> dict:
    return next(n for n in ui["nodes"] if n["id"] == node_id)


@pytest.mark.parametrize("mutate, message", [
    (lambda ui: _ui_node(ui, 10)["widgets_values"].append(1.0), "more than the node's widgets"),
    (lambda ui: _ui_node(ui, 10)["widgets_values"].pop(), "has no value for 'fdg_bands'"),
    (lambda ui: _ui_node(ui, 3)["widgets_values"].remove("fixed"), "control_after_generate"),
    (lambda ui: _ui_node(ui, 3)["widgets_values"].__setitem__(4, "euler_but_faster"), "is not one of"),
    (lambda ui: _ui_node(ui, 10)["widgets_values"].__setitem__(1, 500.0), "outside"),
    (lambda ui: _ui_node(ui, 10)["widgets_values"].__setitem__(0, "0.5"), "is not a FLOAT"),
    (lambda ui: _ui_node(ui, 10).__setitem__("type", "GuidanceKit_APG_Renamed"), "not registered"),
    (lambda ui: _ui_node(ui, 3)["inputs"][0].__setitem__("name", "modell"), "does not exist"),
    (lambda ui: _ui_node(ui, 3)["inputs"][0].__setitem__("link", 999), "missing link"),
    (lambda ui: ui["links"][0].__setitem__(5, "MODEL"), "the link carries MODEL"),
])
def test_converter_rejects_a_broken_ui_workflow(comfy, mutate, message):
    ui = _ui("apg_sdxl")
    convert(comfy, copy.deepcopy(ui))  # the original converts
    mutate(ui)
    with pytest.raises(WorkflowError, match=message):
        convert(comfy, ui)


def test_a_drifted_api_twin_is_detected(comfy):
    twin = load_json(WORKFLOWS / "api" / "apg_sdxl.api.json")
    twin["10"]["inputs"]["norm_threshold"] = 10.0
    assert convert(comfy, _ui("apg_sdxl")) != twin


def test_control_widget_rule_follows_the_frontend():
    assert has_control_widget("INT", "seed", {"control_after_generate": True})
    assert has_control_widget("INT", "noise_seed", {})  # legacy name rule
    assert not has_control_widget("INT", "seed", {"control_after_generate": False})  # V3 explicit False
    assert not has_control_widget("INT", "steps", {})
    assert not has_control_widget("FLOAT", "seed", {})


# ------------------------------------------------------------------------------------------------
# queue_workflow.py
# ------------------------------------------------------------------------------------------------

API_FILES = sorted((WORKFLOWS / "api").glob("*.api.json"))


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name.split(".")[0])
def test_shortcuts_find_the_prompts_and_the_sampler_seed(comfy, path):
    original = queue.load_prompt(path)
    if any(n["class_type"] == "CLIPTextEncode" for n in original.values()):
        prompt, changes = queue.apply_overrides(original, positive="a red fox", negative="ugly", seed=123)
        assert prompt["6"]["inputs"]["text"] == "a red fox" and prompt["7"]["inputs"]["text"] == "ugly"
        prompt_changes = 2
    else:  # the embedded digits model: the class is a loader widget, there is no text prompt to set
        with pytest.raises(queue.QueueError, match="use --set NODE.text"):
            queue.apply_overrides(original, positive="a red fox")
        prompt, changes = queue.apply_overrides(original, seed=123)
        prompt_changes = 0
    seeds = [(i, k) for i, n in prompt.items() for k in ("seed", "noise_seed")
             if k in n["inputs"] and not n["class_type"].startswith(PACK_PREFIX)]  # the sampler's, not a method's
    assert seeds and all(prompt[i]["inputs"][k] == 123 for i, k in seeds)
    assert len(changes) == prompt_changes + len(seeds)
    assert original == queue.load_prompt(path)  # the input is not modified
    assert validate(comfy, prompt)[0] is True


def test_whole_numbers_convert_exactly():
    assert queue.convert("3.0", 1, "x") == 3 and isinstance(queue.convert("3.0", 1, "x"), int)
    assert queue.convert(str(2**64 - 1), 0, "seed") == 2**64 - 1  # no float rounding of 64-bit seeds
    with pytest.raises(queue.QueueError, match="not a whole number"):
        queue.convert("3.5", 1, "steps")


def test_set_converts_to_the_type_of_the_replaced_value():
    prompt = queue.load_prompt(WORKFLOWS / "api" / "stack_cfg_zero_fdg_sd35.api.json")
    out, _ = queue.apply_overrides(prompt, ["3.cfg=9", "6.text=42", "10.optimized_scale=false", "3.seed=7",
                                            "11.scales=6, 3", "KSampler.steps=12", "Negative prompt.text=a=b.c"])
    assert out["3"]["inputs"]["cfg"] == 9.0 and isinstance(out["3"]["inputs"]["cfg"], float)
    assert out["6"]["inputs"]["text"] == "42"
    assert out["10"]["inputs"]["optimized_scale"] is False
    assert out["3"]["inputs"]["seed"] == 7 and out["3"]["inputs"]["steps"] == 12
    assert out["11"]["inputs"]["scales"] == "6, 3"
    assert out["7"]["inputs"]["text"] == "a=b.c"


@pytest.mark.parametrize("sets, message", [
    (["99.text=x"], "no node '99'"),
    (["10.scale=4"], "has no input 'scale'; its inputs: optimized_scale, zero_init_steps"),
    (["3.model=4"], "is connected to node 11"),
    (["3.steps=2.5"], "cannot use '2.5' as int"),
    (["10.optimized_scale=maybe"], "as bool"),
    (["CLIPTextEncode.text=x"], "names several nodes"),
    (["3seed=1"], "expected NODE.INPUT=VALUE"),
])
def test_bad_overrides_are_clear_errors(sets, message):
    prompt = queue.load_prompt(WORKFLOWS / "api" / "stack_cfg_zero_fdg_sd35.api.json")
    with pytest.raises(queue.QueueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        queue.apply_overrides(prompt, sets)
    assert info.value.exit_code == queue.EXIT_USAGE


def test_seed_shortcut_leaves_other_seeds_alone():
    prompt = {"1": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "sampler_name": "euler"}},
              "2": {"class_type": "RandomNoise", "inputs": {"noise_seed": 2}},
              "3": {"class_type": "GuidanceKit_TPG", "inputs": {"seed": 3, "scale": 3.0}}}
    out, _ = queue.apply_overrides(prompt, seed="random")
    assert out["1"]["inputs"]["seed"] == out["2"]["inputs"]["noise_seed"] != 1
    assert out["3"]["inputs"]["seed"] == 3
    with pytest.raises(queue.QueueError, match="integer or 'random'"):
        queue.apply_overrides(prompt, seed="abc")


def test_prompt_shortcut_follows_conditioning_nodes():
    prompt = queue.load_prompt(WORKFLOWS / "api" / "cfg_zero_star_flux.api.json")
    assert prompt["3"]["inputs"]["positive"][0] == "30"  # KSampler ← FluxGuidance ← positive prompt
    out, _ = queue.apply_overrides(prompt, positive="a cat")
    assert out["6"]["inputs"]["text"] == "a cat" and out["7"]["inputs"]["text"] == prompt["7"]["inputs"]["text"]


def test_ui_workflow_is_refused_with_a_hint(capsys):
    assert queue.main([str(WORKFLOWS / "apg_sdxl.json"), "--dry-run"]) == queue.EXIT_USAGE
    assert "is a UI workflow" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_clear_error(capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    code = queue.main([str(WORKFLOWS / "api" / "apg_sdxl.api.json"), "--server", url, "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == queue.EXIT_UNREACHABLE
    assert f"cannot reach ComfyUI at {url}" in err and "Is the server running?" in err


@pytest.fixture
def fake_server(comfy):
    """A /prompt endpoint that validates with ComfyUI's validate_prompt and answers as server.py does."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(body)
            valid, error, _, node_errors = validate(comfy, body["prompt"])
            if valid:
                status, answer = 200, {"prompt_id": f"id-{len(received)}", "number": len(received) - 1,
                                       "node_errors": {}}
            else:
                status, answer = 400, {"error": error, "node_errors": node_errors}
            data = json.dumps(answer, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_queue_posts_the_overridden_prompt_and_prints_the_prompt_id(fake_server, capsys):
    url, received = fake_server
    code = queue.main([str(WORKFLOWS / "api" / "apg_sdxl.api.json"), "--server", url, "--set", "6.text=a red fox",
                       "--set", "3.seed=42", "--set", "10.norm_threshold=4", "--client-id", "abc"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == "id-1"
    body = received[0]
    assert body["client_id"] == "abc"
    assert body["prompt"]["6"]["inputs"]["text"] == "a red fox"
    assert body["prompt"]["10"]["inputs"]["norm_threshold"] == 4.0


def test_queue_reports_the_servers_validation_errors(fake_server, capsys):
    url, _ = fake_server
    code = queue.main([str(WORKFLOWS / "api" / "apg_sdxl.api.json"), "--server", url,
                       "--set", "3.sampler_name=euler_but_faster"])
    err = capsys.readouterr().err
    assert code == queue.EXIT_REJECTED
    assert "rejected the prompt (HTTP 400)" in err and "node 3 (KSampler): Value not in list" in err
