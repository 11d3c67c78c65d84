"""The nodes' help pages and the README methods table, generated from or checked against the node schemas.

One source per node: its schema, the node class's ``define_schema`` (display name, description, input
tooltips).

* ``web/docs/<node id>.md`` (the page ComfyUI's node library shows): the title line is the display name,
  and the "Inputs" block between the two ``generated:inputs`` marker comments lists every input with its
  type, default, range or choices and tooltip — both written here from the schema. Everything else on the
  page is prose written by hand: papers, what the method does, recommended values, measurements, notes on
  the inputs beyond their tooltips (after the block, under the same heading).
* ``README.md``: the methods table between the ``methods-table`` marker comments has one row per node or
  group of nodes. The bold names in a row's first cell are nodes' short display names (the display name
  before " · "); every node appears in exactly one row and no row names a node that does not exist.
  Checked, not generated: its other columns summarise the methods for the README.

    python -m tests.node_docs            # from the pack folder: rewrite the generated parts, report the rest
    python -m tests.node_docs --check    # report only; exit 1 when anything is off (tests/comfyui/test_node_docs.py)

A new node needs: a schema with a display name ("Short name · what it is"), a description and a tooltip on
every input; a help page (this command writes a skeleton with the title and the Inputs block: add the
prose); a row in the README methods table whose first cell names it in bold.
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
    start = readme.find(TABLE_BEGIN)
    end = readme.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no methods table between '{TABLE_BEGIN} ... -->' and '{TABLE_END}'")
    first_line = readme.count("\n", 0, start) + 2
    rows = []
    for n, line in enumerate(readme[start:end].splitlines()[1:], first_line):
        if not line.startswith("|") or re.match(r"^\|[\s|:-]+\|$", line):
            continue
        cell = re.split(r"(?<!\\)\|", line)[1]
        names = [re.sub(r"\\(.)", r"\1", m) for m in re.findall(r"\*\*((?:\\.|[^*\\])+)\*\*", cell)]
        rows.append((n, names))
    return rows[1:]  # the first row is the header


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def problems(schemas: list, docs: Path = DOCS, readme: Path = README) -> list[str]:
    """Everything that differs from the schemas: stale generated parts, pages or rows missing or extra."""
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
        rows = readme_rows(readme.read_text(encoding="utf-8"))
    except ValueError as e:
        return found + [str(e)]
    by_name = {short_name(s.display_name): s for s in schemas}
    if len(by_name) < len(schemas):
        found.append("two nodes share a short display name: " + ", ".join(sorted(s.display_name for s in schemas)))
    seen: dict[str, int] = {}
    for line, names in rows:
        if not names:
            found.append(f"README.md:{line}: a methods-table row without a bold node name in its first cell")
        for name in names:
            if name not in by_name:
                found.append(f"README.md:{line}: **{name}** is not a node's short display name (the nodes: "
                             f"{', '.join(by_name)})")
            elif name in seen:
                found.append(f"README.md:{line}: **{name}** already has a row (line {seen[name]})")
            else:
                seen[name] = line
    for name, schema in by_name.items():
        if name not in seen:
            found.append(f"README.md: no methods-table row for {schema.node_id} (a row whose first cell has "
                         f"**{name}**)")
    return found


def node_schemas() -> list:
    from guidance_kit.nodes import node_list

    return [node.GET_SCHEMA() for node in node_list()]


def write(schemas: list, docs: Path = DOCS) -> list[Path]:
    """Rewrite the generated parts of every help page (a skeleton where a node has none); the pages changed."""
    changed = []
    for schema in schemas:
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
    schemas = node_schemas()
    if not args.check:
        try:
            for page in write(schemas):
                print(f"wrote {_shown(page)}")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    found = problems(schemas)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
