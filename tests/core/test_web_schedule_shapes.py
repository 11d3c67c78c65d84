"""The web preview (web/js/schedule_math.js) draws the same schedule shapes the Python side offers."""

import re
from pathlib import Path

from guidance_kit.guiders.schedules import SHAPES

JS = Path(__file__).resolve().parents[2] / "web" / "js" / "schedule_math.js"


def test_js_preview_lists_exactly_the_python_schedule_shapes():
    text = JS.read_text(encoding="utf-8")
    block = re.search(r"export const SHAPES = Object\.freeze\(\[(.*?)\]\)", text, re.S)
    assert block, "schedule_math.js no longer exports SHAPES"
    assert tuple(re.findall(r'"([a-z_]+)"', block.group(1))) == SHAPES
