"""The pack loads in real ComfyUI (V3 entrypoint only) and every node is well-formed."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import asyncio

import pytest

from guidance_kit.nodes import node_list
from guidance_kit.nodes.common import NODE_PREFIX
from tests.conftest import REPO

NODES = node_list()
IDS = [node.GET_SCHEMA().node_id for node in NODES]


def test_node_ids_are_unique_and_prefixed():
    assert len(set(IDS)) == len(IDS), sorted(i for i in IDS if IDS.count(i) > 1)
    assert all(i.startswith(NODE_PREFIX) for i in IDS)


@pytest.fixture(scope="module")
def loaded():
    import nodes

    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(REPO)))
    return ok, set(nodes.NODE_CLASS_MAPPINGS) - before, nodes


def test_comfyui_loads_the_pack_without_error(loaded):
    ok, added, nodes = loaded
    assert ok
    assert added == set(IDS)  # every node of node_list() registered by ComfyUI's loader, and nothing else
    for node_id, node in zip(IDS, NODES):  # ComfyUI imports the pack as its own module: the same classes by name
        assert nodes.NODE_CLASS_MAPPINGS[node_id].__name__ == node.__name__
    module_name = REPO.name
    assert module_name in nodes.EXTENSION_WEB_DIRS  # WEB_DIRECTORY registered


def test_package_exports_only_the_v3_entrypoint():
    import guidance_kit

    assert callable(guidance_kit.comfy_entrypoint)
    assert not hasattr(guidance_kit, "NODE_CLASS_MAPPINGS")  # V1 would shadow the V3 entrypoint
    assert guidance_kit.WEB_DIRECTORY == "./web"


@pytest.mark.parametrize("node", node_list(), ids=lambda n: n.__name__)
def test_every_input_has_a_tooltip_and_the_node_a_description(node):
    schema = node.GET_SCHEMA()
    assert schema.node_id.startswith(NODE_PREFIX)
    assert schema.category.startswith("sampling/guidance")
    assert len(schema.description) > 80
    assert "·" in schema.display_name or "Guider" in schema.display_name
    for inp in schema.inputs:
        assert inp.tooltip and len(inp.tooltip) > 20, f"{schema.node_id}.{inp.id} has no useful tooltip"
    for o in schema.outputs:
        assert o.tooltip


def test_node_info_is_valid_for_the_frontend():
    for node in node_list():
        info = node.GET_NODE_INFO_V1()
        assert info["name"] == node.GET_SCHEMA().node_id
        for name, spec in info["input"]["required"].items():
            assert "tooltip" in spec[1], name


def test_compare_rows_come_from_the_node_classes():
    """compare.py reads each node's COMPARE from the source (no ComfyUI); it is the imported class's."""
    from guidance_kit.comparison.methods import METHODS, node_class

    declared = {node.COMPARE["key"]: node for node in NODES if hasattr(node, "COMPARE")}
    assert set(declared) == set(METHODS) - {"cfg"}
    for key, node in declared.items():
        assert node_class(METHODS[key]) is node
