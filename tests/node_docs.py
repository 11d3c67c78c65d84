"""The nodes' help pages and the README methods table, generated from or checked against the node schemas.

One source per node: its schema, the node class's ``define_schema`` (display name, description, input
tooltips).

* ``web/docs/<node id>.md`` (the page ComfyUI's node library shows): the title line is the display name,
  and the "Inputs" block between the two ``generated:inputs`` marker comments lists every input with its
  type, default, range or choices and tooltip — both written here from the schema. Everything else on the
  page is prose written by hand: papers, what the method does, recommended values, measurements, notes on
  the inputs beyond their tooltips (after the block, under the same heading).
* ``README.md``: the methods table between the ``methods-table`` marker comments, generated here from the
  node classes: one row per node that declares ``README_ROW = (method and paper, families, extra model calls
  per step)``, in the order of ``node_list()``, its first cell the node's short display name (the display name
  before " · ") in bold, plus " (sampler)" for SAMPLER nodes and "(+ **name**)" for each node that declares
  ``README_JOIN = "<node id of that row>"`` (a helper node listed with its method, e.g. S-CFG Map).
* ``README.md``: the model-family table between the ``families-table`` marker comments, generated here from the
  family table ``nodes/runtime/families.py`` (``TABLE``: one row per family spec, what serves it or why not;
  ``NEWER_ONLY``: the families only newer ComfyUI builds).

    python -m tests.node_docs            # from the pack folder: rewrite the generated parts, report the rest
    python -m tests.node_docs --check    # report only; exit 1 when anything is off (tests/comfyui/test_node_docs.py)

A new node needs: a schema with a display name ("Short name · what it is"), a description and a tooltip on
every input, and ``README_ROW`` (or ``README_JOIN``) on its class; a help page (this command writes a skeleton
with the title and the Inputs block: add the prose). The README row is written by this command.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "web" / "docs"
README = REPO / "README.md"

BEGIN = ("<!-- generated:inputs: from the node's schema (its define_schema) by `python -m tests.node_docs`; "
         "edit the tooltips there, not this list -->")
END = "<!-- /generated:inputs -->"
TABLE_BEGIN = "<!-- methods-table"
TABLE_END = "<!-- /methods-table -->"
FAMILIES_BEGIN = "<!-- families-table"
FAMILIES_END = "<!-- /families-table -->"
MIN_PROSE = 300  # characters of hand-written text a help page needs besides its generated parts
COMMAND = "python -m tests.node_docs"


def short_name(display_name: str) -> str:
    """The name a node goes by in prose and in the README: the display name before " · " (and before a
    trailing parenthesis: 'Guidance Guider (for SamplerCustomAdvanced)' → 'Guidance Guider')."""
    head = display_name.split(" · ")[0].strip()
    return re.sub(r"\s*\([^()]*\)$", "", head)


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def input_line(inp) -> str:
    """One input as a Markdown list item: name, type, default, range or choices, tooltip (read from the input's
    attributes, not from ``as_dict()``, whose keys vary between ComfyUI versions)."""
    io_type = str(getattr(inp, "io_type", None) or inp.get_io_type())
    default = getattr(inp, "default", None)
    facts = []
    if io_type == "COMBO":
        if default is not None:
            facts.append(", ".join(f"`{o}`" + (" (default)" if o == default else "") for o in map(str, inp.options)))
        else:  # a list without a default is built from this machine's files (e.g. models/loras)
            facts.append("a file from the list")
    else:
        facts.append(io_type)
        if isinstance(default, bool):
            facts.append(f"default {'on' if default else 'off'}")
        elif isinstance(default, str):
            facts.append(f"default `{default}`")
        elif default is not None:
            facts.append(f"default {_number(default)}")
        low, high = getattr(inp, "min", None), getattr(inp, "max", None)
        if low is not None and high is not None and abs(high) < 2 ** 31:
            facts.append(f"{_number(low)} to {_number(high)}")
    tooltip = " ".join((inp.tooltip or "").split())
    return f"- **`{inp.id}`** · {', '.join(facts)} — {tooltip}"


def inputs_block(schema) -> str:
    lines = [BEGIN, "## Inputs", ""]
    lines += [input_line(inp) for inp in schema.inputs] or ["None."]
    return "\n".join(lines + ["", END])


def _block_span(text: str) -> tuple[int, int] | None:
    start = text.find("<!-- generated:inputs")
    end = text.find(END)
    if start < 0 or end < start:
        return None
    return start, end + len(END)


def render_page(text: str | None, schema) -> str:
    """The help page with its generated parts (title line, Inputs block) rewritten from ``schema``;
    a skeleton for a node without one. The marker lines must be on the page."""
    title = f"# {schema.display_name}"
    if text is None:
        return (f"{title}\n\n<!-- what it does, the paper, when to use it, recommended values: written by hand -->\n\n"
                f"{inputs_block(schema)}\n")
    first, newline, rest = text.partition("\n")
    text = title + newline + rest if first.startswith("# ") else f"{title}\n\n{text}"
    span = _block_span(text)
    if span is None:
        raise ValueError(f"web/docs/{schema.node_id}.md has no generated Inputs block: put the two lines\n"
                         f"{BEGIN}\n{END}\nwhere its Inputs section belongs and run {COMMAND}")
    return text[:span[0]] + inputs_block(schema) + text[span[1]:]


def prose_length(text: str) -> int:
    """Characters of hand-written text: the page without its title line, generated block and comments."""
    span = _block_span(text)
    if span is not None:
        text = text[:span[0]] + text[span[1]:]
    text = re.sub(r"<!--.*?-->", "", text.partition("\n")[2], flags=re.S)
    return len(text.strip())


def readme_rows(readme: str) -> list[tuple[int, list[str]]]:
    """(line number, the bold names of the first cell) for every row of the README's methods table."""
    start, end = _table_span(readme)
    first_line = readme.count("\n", 0, start) + 2
    rows = []
    for n, line in enumerate(readme[start:end].splitlines()[1:], first_line):
        if not line.startswith("|") or re.match(r"^\|[\s|:-]+\|$", line):
            continue
        cell = re.split(r"(?<!\\)\|", line)[1]
        names = [re.sub(r"\\(.)", r"\1", m) for m in re.findall(r"\*\*((?:\\.|[^*\\])+)\*\*", cell)]
        rows.append((n, names))
    return rows[1:]  # the first row is the header


def _table_span(readme: str, begin: str = TABLE_BEGIN, end_marker: str = TABLE_END) -> tuple[int, int]:
    """Where the table's text starts (after the marker comment's line) and ends (at the closing marker)."""
    start = readme.find(begin)
    end = readme.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no table between '{begin} ... -->' and '{end_marker}'")
    return readme.index("\n", start) + 1, end


def _markdown(text: str) -> str:
    """A cell's text inside a Markdown table: its pipes escaped."""
    return text.replace("|", "\\|")


def _bold(name: str) -> str:
    return "**" + name.replace("*", "\\*") + "**"


TABLE_HEADER = "| Node | Method (paper) | Families | Extra model calls per step |\n|---|---|---|---|\n"


def readme_table(nodes: list) -> str:
    """The methods table generated from the node classes' ``README_ROW`` / ``README_JOIN`` (see the module
    docstring); raises ValueError naming a node that declares neither, or a join to a node without a row."""
    ids = {node.GET_SCHEMA().node_id: node for node in nodes}
    joined: dict[str, list[str]] = {}
    for node in nodes:
        target = getattr(node, "README_JOIN", None)
        if target is not None:
            if target not in ids or getattr(ids[target], "README_ROW", None) is None:
                raise ValueError(f"{node.__name__}.README_JOIN names {target!r}, which is not a node with a README_ROW")
            joined.setdefault(target, []).append(short_name(node.GET_SCHEMA().display_name))
    rows = []
    for node in nodes:
        schema = node.GET_SCHEMA()
        row = getattr(node, "README_ROW", None)
        if row is None:
            if getattr(node, "README_JOIN", None) is None:
                raise ValueError(f"{schema.node_id}: declare README_ROW = (method and paper, families, extra model "
                                 f"calls per step) on {node.__name__} (or README_JOIN = '<node id>') for the README "
                                 f"methods table")
            continue
        if len(row) != 3 or not all(isinstance(c, str) and c.strip() for c in row):
            raise ValueError(f"{node.__name__}.README_ROW must be three texts (method and paper, families, cost)")
        first = _bold(short_name(schema.display_name))
        if [str(getattr(o, "io_type", "") or o.get_io_type()) for o in schema.outputs] == ["SAMPLER"]:
            first += " (sampler)"
        for name in joined.get(schema.node_id, []):
            first += f" (+ {_bold(name)})"
        rows.append("| " + " | ".join([first, *(_markdown(c) for c in row)]) + " |\n")
    return "\n" + TABLE_HEADER + "".join(rows) + "\n"


FAMILIES_HEADER = ("| Family | ComfyUI class (`comfy.ldm.…`) | PAG, SEG, TPG, Skip-Layer, S² | NAG | S-CFG | TSG |\n"
                   "|---|---|---|---|---|---|\n")


def _family_cells(spec) -> list[str]:
    """What serves one family spec: the block methods, NAG, S-CFG, TSG (or why not)."""
    if spec.perturbations and spec.transformer_options_in_blocks:
        blocks = "yes" if spec.rope else "yes; TPG refused (no rotary positions)"
    else:
        blocks = "refused: " + (spec.refusal or "no block hook")
    if spec.nag and spec.transformer_options_in_blocks:
        nag = "yes (" + {"attn2": "cross-attention", "joint": "joint attention", "cross": "cross-attention"}[spec.nag]
        nag += f"; auto {spec.nag_defaults.scale:g} / {spec.nag_defaults.tau:g} / {spec.nag_defaults.alpha:g})"
    elif spec.nag_refusal and spec.nag_refusal == spec.refusal:
        nag = "refused: the same reason"
    else:
        nag = "refused: " + (spec.nag_refusal or spec.refusal or "no text-attention hook")
    scfg = "yes" if spec.scfg else "—"
    if spec.time_embedding is not None:
        tsg = f"yes (`{spec.time_embedding.path}`)"
    else:
        tsg = "legacy time-input mode" + (f" ({spec.time_embedding_refusal})" if spec.time_embedding_refusal else "")
    return [blocks, nag, scfg, tsg]


def families_table() -> str:
    """The README family table from ``nodes/runtime/families.py``: every family the table knows (one row per
    spec, its exact classes), then the families only newer ComfyUI builds."""
    from guidance_kit.nodes.runtime import families

    classes: dict[int, list[str]] = {}
    specs = {}
    for qualified, spec in families.TABLE.items():
        classes.setdefault(id(spec), []).append("`" + qualified.removeprefix("comfy.ldm.") + "`")
        specs[id(spec)] = spec
    rows = []
    for key, spec in specs.items():
        cells = [spec.name, ", ".join(classes[key]), *_family_cells(spec)]
        rows.append("| " + " | ".join(_markdown(c) for c in cells) + " |\n")
    for family, cls, status in families.NEWER_ONLY:
        cells = [f"{family} (newer ComfyUI)", f"`{cls}`", status, "see left", "see left", "see left"]
        rows.append("| " + " | ".join(_markdown(c) for c in cells) + " |\n")
    return "\n" + FAMILIES_HEADER + "".join(rows) + "\n"


def render_readme(readme: str, nodes: list) -> str:
    start, end = _table_span(readme)
    readme = readme[:start] + readme_table(nodes) + readme[end:]
    start, end = _table_span(readme, FAMILIES_BEGIN, FAMILIES_END)
    return readme[:start] + families_table() + readme[end:]


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def problems(nodes: list, docs: Path = DOCS, readme: Path = README) -> list[str]:
    """Everything that differs from the node classes: stale generated parts, pages missing or extra."""
    schemas = [node.GET_SCHEMA() for node in nodes]
    found = []
    ids = {s.node_id for s in schemas}
    for schema in schemas:
        page = docs / f"{schema.node_id}.md"
        if not page.is_file():
            found.append(f"{schema.display_name}: no help page {_shown(page)} ({COMMAND} writes a "
                         f"skeleton)")
            continue
        text = page.read_text(encoding="utf-8")
        try:
            current = render_page(text, schema) == text
        except ValueError as e:
            found.append(str(e))
            continue
        if not current:
            found.append(f"{_shown(page)}: title or Inputs block differs from the schema (run {COMMAND})")
        if prose_length(text) < MIN_PROSE:
            found.append(f"{_shown(page)}: fewer than {MIN_PROSE} characters of hand-written text (what "
                         f"the method does, its paper, when to use it)")
    for page in sorted(docs.glob("*.md")):
        if page.stem not in ids:
            found.append(f"{_shown(page)}: no node has the id {page.stem!r}")
    try:
        text = readme.read_text(encoding="utf-8")
        start, end = _table_span(text)
        if text[start:end] != readme_table(nodes):
            found.append(f"README.md: the methods table differs from the nodes' README_ROW (run {COMMAND})")
        start, end = _table_span(text, FAMILIES_BEGIN, FAMILIES_END)
        if text[start:end] != families_table():
            found.append(f"README.md: the family table differs from nodes/runtime/families.py (run {COMMAND})")
    except ValueError as e:
        found.append(str(e))
    return found


def node_classes() -> list:
    from guidance_kit.nodes import node_list

    return list(node_list())


def write(nodes: list, docs: Path = DOCS, readme: Path | None = README) -> list[Path]:
    """Rewrite the generated parts of every help page (a skeleton where a node has none) and the README's methods
    table; the files changed."""
    changed = []
    if readme is not None:
        text = readme.read_text(encoding="utf-8")
        new = render_readme(text, nodes)
        if new != text:
            readme.write_text(new, encoding="utf-8")
            changed.append(readme)
    for schema in (node.GET_SCHEMA() for node in nodes):
        page = docs / f"{schema.node_id}.md"
        text = page.read_text(encoding="utf-8") if page.is_file() else None
        new = render_page(text, schema)
        if new != text:
            page.write_text(new, encoding="utf-8")
            changed.append(page)
    return changed


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is off")
    args = parser.parse_args(argv)
    from tests.conftest import comfy_setup  # the pack as guidance_kit

    try:
        comfy_setup.import_comfyui(cpu=True)
    except comfy_setup.ComfyUINotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nodes = node_classes()
    if not args.check:
        try:
            for page in write(nodes):
                print(f"wrote {_shown(page)}")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    found = problems(nodes)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
