"""The pack loads in real ComfyUI (V3 entrypoint only) and every node is well-formed."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import asyncio

import pytest

from guidance_kit.nodes import node_list
from tests.conftest import REPO

EXPECTED = {"GuidanceKit_CFGSchedule", "GuidanceKit_BetaCFG", "GuidanceKit_APG", "GuidanceKit_TCFG",
            "GuidanceKit_CFGZeroStar", "GuidanceKit_FDG", "GuidanceKit_Rescale", "GuidanceKit_GuidanceGuider",
            "GuidanceKit_PAG", "GuidanceKit_SEG", "GuidanceKit_TPG", "GuidanceKit_SkipLayer", "GuidanceKit_S2Guidance",
            "GuidanceKit_TSG", "GuidanceKit_ICG", "GuidanceKit_AdaptiveGuidance", "GuidanceKit_NAG",
            "GuidanceKit_SamplerDPMPP2MSDECFGPP", "GuidanceKit_SamplerDPMPP3MSDECFGPP", "GuidanceKit_SamplerPCG",
            "GuidanceKit_SCFG", "GuidanceKit_SCFGMap", "GuidanceKit_Autoguidance", "GuidanceKit_UnconditionalPrior",
            "GuidanceKit_NPO", "GuidanceKit_PersonalizationGuidance", "GuidanceKit_DigitsModelLoader",
            "GuidanceKit_DigitsDecode"}


@pytest.fixture(scope="module")
def loaded():
    import nodes

    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(REPO)))
    return ok, set(nodes.NODE_CLASS_MAPPINGS) - before, nodes


def test_comfyui_loads_the_pack_without_error(loaded):
    ok, added, nodes = loaded
    assert ok
    assert EXPECTED <= added
    assert all(n.startswith("GuidanceKit_") for n in added)
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
    assert schema.node_id in EXPECTED
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


@pytest.mark.parametrize("node", node_list(), ids=lambda n: n.__name__)
def test_every_node_has_a_help_page(node):
    page = REPO / "web" / "docs" / f"{node.GET_SCHEMA().node_id}.md"
    assert page.is_file(), f"missing {page.relative_to(REPO)}"
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# ") and len(text) > 400
