"""Workflows saved with an earlier release keep working: API prompts (POST /prompt) name only the inputs that
release had, and UI files list widget values by position. So a node may only *add* inputs, optional and after
the released ones, and never remove, rename or reorder a released input.

``data/released_inputs_0.1.0.json`` is the first release's schema (node id → inputs in order, optional or not).
"""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import json
from pathlib import Path

import pytest

from guidance_kit.nodes import node_list

RELEASED = json.loads((Path(__file__).parent / "data" / "released_inputs_0.1.0.json").read_text(encoding="utf-8"))
CURRENT = {n.GET_SCHEMA().node_id: n for n in node_list()}


def current_inputs(node_id: str) -> dict[str, bool]:
    return {i.id: bool(getattr(i, "optional", False)) for i in CURRENT[node_id].GET_SCHEMA().inputs}


@pytest.mark.parametrize("node_id", sorted(RELEASED["nodes"]))
def test_released_node_keeps_its_inputs_in_order(node_id):
    assert node_id in CURRENT, f"{node_id} was released and is gone: saved workflows would fail"
    released, now = RELEASED["nodes"][node_id], current_inputs(node_id)
    missing = [name for name in released if name not in now]
    assert not missing, f"{node_id}: released inputs {missing} are gone (saved API prompts name them)"
    for kind in (False, True):  # the frontend lays out required widgets, then optional ones, each in order
        old_order = [name for name, optional in released.items() if optional is kind]
        new_order = [name for name, optional in now.items() if optional is kind and name in released]
        assert new_order == old_order, f"{node_id}: released inputs reordered (UI files map values by position)"


@pytest.mark.parametrize("node_id", sorted(CURRENT))
def test_inputs_added_after_the_release_are_optional(node_id):
    released = RELEASED["nodes"].get(node_id, {})
    added_required = [name for name, optional in current_inputs(node_id).items()
                      if name not in released and not optional]
    assert not released or not added_required, (
        f"{node_id}: {added_required} added as required inputs: an API prompt saved with the release lacks them "
        f"('Required input is missing'). Add them as optional inputs with a default, after the released ones.")
    if released:
        names = list(current_inputs(node_id))
        assert names[:len(released)] == [n for n in names if n in released], \
            f"{node_id}: new inputs must come after the released ones"


def test_a_released_api_prompt_still_executes_with_the_defaults():
    """The released input set alone (no new inputs) runs every node that has new inputs."""
    import inspect

    for node_id, node in CURRENT.items():
        released = RELEASED["nodes"].get(node_id)
        if not released:
            continue
        added = [name for name in current_inputs(node_id) if name not in released]
        if not added:
            continue
        parameters = inspect.signature(node.execute).parameters
        for name in added:
            assert name in parameters and parameters[name].default is not inspect.Parameter.empty, \
                f"{node_id}.execute has no default for the added input {name!r}"
