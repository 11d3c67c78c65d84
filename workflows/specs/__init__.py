"""The workflow specs: one function per workflow that returns a :class:`..graph.Workflow`, grouped by topic
like nodes/ (cfg_methods.py, perturbation.py with Adaptive Guidance, nag.py, samplers.py, scfg.py,
model_guidance.py, digits.py); the shared presets and graph templates are in common.py.

A spec names node types, sets widget values (the others take the defaults the node schemas declare) and links
outputs to inputs; how a node type looks (widget order, sockets, title) comes from the node catalog
(``catalog.json`` here, generated from the node schemas). Each workflow's Note is ``notes/<name>.md``.

``WORKFLOWS`` holds every function named ``wf_*`` of the topic modules, in the order of ``TOPICS`` and, within a
module, of definition: the order of the table in workflows/README.md. A new workflow is a new ``wf_*`` function
(and its Note); nothing else lists it.
"""

from __future__ import annotations

from collections.abc import Callable

from ..graph import Workflow
from . import cfg_methods, digits, model_guidance, nag, perturbation, samplers, scfg

TOPICS = (cfg_methods, perturbation, nag, samplers, scfg, model_guidance, digits)


def _collect() -> list[Callable[[], Workflow]]:
    return [fn for module in TOPICS for name, fn in vars(module).items()
            if name.startswith("wf_") and callable(fn) and fn.__module__ == module.__name__]


WORKFLOWS: list[Callable[[], Workflow]] = _collect()
