"""The workflow specs: one function per workflow that returns a :class:`..graph.Workflow`, grouped by topic
like nodes/ (cfg_methods.py, perturbation.py with Adaptive Guidance, nag.py, samplers.py, scfg.py,
model_guidance.py, digits.py); the shared presets and graph templates are in common.py.

A spec names node types, sets widget values (the others take the defaults the node schemas declare) and links
outputs to inputs; how a node type looks (widget order, sockets, title) comes from the node catalog
(``catalog.json`` here, generated from the node schemas). Each workflow's Note is ``notes/<name>.md``.

``WORKFLOWS`` holds every function named ``wf_*`` of the topic modules, in the order of ``TOPICS`` and, within a
module, of definition, each topic followed by the workflows declared in a Note file's header for it
(``common.declared``; by file name): the order of the table in workflows/README.md. A new workflow is a new
``wf_*`` function and its Note, or, for a single chain on a standard graph, one Note file with a header;
nothing else lists it.
"""

from __future__ import annotations

from collections.abc import Callable

from ..graph import SpecError, Workflow
from . import cfg_methods, common, digits, model_guidance, nag, perturbation, samplers, scfg
from .common import NOTES_DIR

TOPICS = (cfg_methods, perturbation, nag, samplers, scfg, model_guidance, digits)


def _collect() -> list[Callable[[], Workflow]]:
    declared: dict[str, list] = {}
    for path in sorted(NOTES_DIR.glob("*.md")):  # workflows declared in their Note file (common.declared)
        found = common.declared(path)
        if found is not None:
            declared.setdefault(found[0], []).append(found[1])
    topics = {module.__name__.rsplit(".", 1)[-1] for module in TOPICS}
    unknown = set(declared) - topics
    if unknown:
        raise SpecError(f"workflow Notes name unknown topics {sorted(unknown)}; use one of {sorted(topics)}")
    return [fn for module in TOPICS
            for fn in [f for name, f in vars(module).items()
                       if name.startswith("wf_") and callable(f) and f.__module__ == module.__name__]
            + declared.get(module.__name__.rsplit(".", 1)[-1], [])]


WORKFLOWS: list[Callable[[], Workflow]] = _collect()
