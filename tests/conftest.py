"""Test setup shared by both tiers.

* one torch thread (two threads on a busy 2-core machine made every op 30–40× slower);
* the pack is importable as the package ``guidance_kit`` (its folder name has hyphens) and ComfyUI is
  located for the ComfyUI tier, which skips with a visible reason otherwise — both by
  ``digits/comfy_setup.py``, the pack's one module for it (also used by compare.py and digits/):
  ``COMFYUI_PATH``, the ComfyUI this pack sits in (``ComfyUI/custom_nodes``), or ``~/ComfyUI``;
* a summary line per tier, and a failure if the core tier ran no test.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "guidance_kit"


def _load_comfy_setup():
    """``digits/comfy_setup.py`` by path (it imports nothing of the pack), under its name in the package."""
    name = f"{PACKAGE}.digits.comfy_setup"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "digits" / "comfy_setup.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


comfy_setup = _load_comfy_setup()
comfy_setup.import_pack()

try:
    COMFYUI_PATH, COMFYUI_HOW = comfy_setup.locate_comfyui()
except comfy_setup.ComfyUINotFound as e:  # COMFYUI_HOW is then the reason the ComfyUI tier skips
    COMFYUI_PATH, COMFYUI_HOW = None, f"{e} The ComfyUI tier needs one."


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: needs a ComfyUI checkout (tier 2)")


def _tier(item) -> str:
    return "comfyui" if "tests/comfyui" in str(item.fspath).replace(os.sep, "/") else "core"


_outcomes: dict[str, dict[str, int]] = {"core": {}, "comfyui": {}}
_skip_reasons: set[str] = set()


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        tier = "comfyui" if "tests/comfyui" in report.nodeid else "core"
        outcome = report.outcome
        _outcomes[tier][outcome] = _outcomes[tier].get(outcome, 0) + 1
        if outcome == "skipped" and isinstance(report.longrepr, tuple):
            _skip_reasons.add(report.longrepr[2])


def pytest_collectreport(report):
    if report.outcome == "skipped" and "tests/comfyui" in report.nodeid:
        _outcomes["comfyui"]["skipped modules"] = _outcomes["comfyui"].get("skipped modules", 0) + 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    tr.section("Guidance Kit test tiers")
    for tier, label in (("core", "core tier (pure torch)"), ("comfyui", "ComfyUI tier")):
        counts = _outcomes[tier]
        text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no tests run"
        tr.write_line(f"{label}: {text}")
    if COMFYUI_PATH is None:
        tr.write_line(f"ComfyUI tier SKIPPED: {COMFYUI_HOW}")
    else:
        tr.write_line(f"ComfyUI checkout: {COMFYUI_PATH} ({COMFYUI_HOW})")


def pytest_sessionfinish(session, exitstatus):
    if session.config.option.collectonly:
        return
    if sum(c.get("passed", 0) for c in _outcomes.values()) == 0:
        # "no tests ran" must never pass CI (pytest's own exit code 5 is also non-zero)
        session.exitstatus = 1
