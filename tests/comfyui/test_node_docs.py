"""The help pages and the README methods table follow the node schemas (tests/node_docs.py).

The schema (display name, description, tooltips) is the one source: each help page's title and Inputs
block are generated from it (``python -m tests.node_docs`` rewrites them), the rest of the page is prose;
the README table names every node once, by its display name.
"""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest

from guidance_kit.nodes import node_list
from tests import node_docs

NODES = list(node_list())
SCHEMAS = [node.GET_SCHEMA() for node in NODES]
FIX = f"run `{node_docs.COMMAND}` from the pack folder and commit the pages it wrote"


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.node_id)
def test_help_page_title_and_inputs_are_generated_from_the_schema(schema):
    page = node_docs.DOCS / f"{schema.node_id}.md"
    assert page.is_file(), f"no help page {page.relative_to(node_docs.REPO)}: {FIX} (it writes a skeleton)"
    text = page.read_text(encoding="utf-8")
    assert node_docs.render_page(text, schema) == text, f"{page.name} differs from the node's schema: {FIX}"
    for inp in schema.inputs:
        assert f"- **`{inp.id}`**" in text


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.node_id)
def test_help_page_has_prose_beyond_the_generated_parts(schema):
    text = (node_docs.DOCS / f"{schema.node_id}.md").read_text(encoding="utf-8")
    assert node_docs.prose_length(text) >= node_docs.MIN_PROSE


def test_no_help_page_without_a_node():
    ids = {s.node_id for s in SCHEMAS}
    assert sorted(p.name for p in node_docs.DOCS.glob("*.md") if p.stem not in ids) == []


def test_readme_methods_table_names_every_node_once_by_its_display_name():
    problems = [p for p in node_docs.problems(NODES) if p.startswith("README")]
    assert problems == []
    names = [name for _, row in node_docs.readme_rows(node_docs.README.read_text(encoding="utf-8")) for name in row]
    assert sorted(names) == sorted(node_docs.short_name(s.display_name) for s in SCHEMAS)


def test_the_readme_table_is_generated_from_the_node_classes():
    readme = node_docs.README.read_text(encoding="utf-8")
    assert node_docs.render_readme(readme, NODES) == readme, f"README methods table is stale: {FIX}"
    apg = next(n for n in NODES if n.__name__ == "APGNode")
    row = next(line for line in readme.splitlines() if line.startswith("| **APG** |"))
    assert row == "| **APG** | " + " | ".join(c.replace("|", "\\|") for c in apg.README_ROW) + " |"


def test_a_node_without_a_readme_row_is_named():
    class Undeclared:
        GET_SCHEMA = NODES[0].GET_SCHEMA

    with pytest.raises(ValueError, match="declare README_ROW"):
        node_docs.readme_table([Undeclared])


def test_the_check_finds_nothing():
    assert node_docs.problems(NODES) == []


def test_the_check_reports_what_is_off(tmp_path):
    """A stale tooltip, a page of a removed node, a README row of a removed node and a node without a row."""
    apg = next(s for s in SCHEMAS if s.node_id.endswith("_APG"))
    docs = tmp_path / "docs"
    docs.mkdir()
    for schema in SCHEMAS:
        text = (node_docs.DOCS / f"{schema.node_id}.md").read_text(encoding="utf-8")
        if schema is apg:
            text = text.replace(apg.inputs[1].tooltip[:30], "an old tooltip")
        (docs / f"{schema.node_id}.md").write_text(text, encoding="utf-8")
    (docs / "GuidanceKit_Removed.md").write_text("# Removed · a node that is gone\n", encoding="utf-8")
    readme = node_docs.README.read_text(encoding="utf-8")
    readme = readme.replace("| **TCFG** |", "| **Removed** |")
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    problems = "\n".join(node_docs.problems(NODES, docs, tmp_path / "README.md"))
    assert "GuidanceKit_APG.md: title or Inputs block differs" in problems
    assert "no node has the id 'GuidanceKit_Removed'" in problems
    assert "README.md: the methods table differs from the nodes' README_ROW" in problems
    assert "family table" not in problems


def test_the_family_table_follows_the_family_module(tmp_path, monkeypatch):
    """The README family table is generated from nodes/runtime/families.py: a changed family row makes it stale."""
    from guidance_kit.nodes.runtime import families

    readme = node_docs.README.read_text(encoding="utf-8")
    assert "| Lumina2 | `lumina.model.NextDiT` | yes |" in readme
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    assert node_docs.problems(NODES, readme=tmp_path / "README.md") == []
    monkeypatch.setattr(families, "NEWER_ONLY", families.NEWER_ONLY[:-1])
    problems = node_docs.problems(NODES, readme=tmp_path / "README.md")
    assert problems == ["README.md: the family table differs from nodes/runtime/families.py (run python -m "
                        "tests.node_docs)"]


def test_a_new_node_gets_a_skeleton_page_that_the_check_rejects_until_written(tmp_path):
    apg = next(s for s in SCHEMAS if s.node_id.endswith("_APG"))
    written = node_docs.write([next(n for n in NODES if n.GET_SCHEMA() is apg or n.__name__ == "APGNode")],
                              tmp_path, readme=None)
    text = written[0].read_text(encoding="utf-8")
    assert text.startswith(f"# {apg.display_name}\n") and node_docs.render_page(text, apg) == text
    assert node_docs.prose_length(text) < node_docs.MIN_PROSE


def test_short_names():
    assert node_docs.short_name("APG · Adaptive Projected Guidance") == "APG"
    assert node_docs.short_name("Guidance Guider (for SamplerCustomAdvanced)") == "Guidance Guider"
    assert node_docs.short_name("Digits Decode · 8×8 latent to image (Guidance Kit)") == "Digits Decode"
