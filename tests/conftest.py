"""Test setup shared by both tiers.

* one torch thread (two threads on a busy 2-core machine made every op 30–40× slower);
* the pack is importable as the package ``guidance_kit`` (its folder name has hyphens);
* ComfyUI is located (``COMFYUI_PATH``, this repo inside ``ComfyUI/custom_nodes``, or
  ``~/ComfyUI``) for the ComfyUI tier, which skips with a visible reason otherwise;
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


def _register_package() -> None:
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


_register_package()


def find_comfyui() -> tuple[Path | None, str]:
    """(path, how it was found) or (None, why not)."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = []
    if env:
        candidates.append((Path(env).expanduser(), "COMFYUI_PATH"))
    if REPO.parent.name == "custom_nodes":
        candidates.append((REPO.parent.parent, "this repo is in ComfyUI/custom_nodes"))
    candidates.append((Path.home() / "ComfyUI", "~/ComfyUI"))
    for path, how in candidates:
        if (path / "comfy" / "samplers.py").is_file() and (path / "main.py").is_file():
            return path, how
    looked = ", ".join(str(p) for p, _ in candidates)
    return None, (f"no ComfyUI checkout found (looked at {looked}); set COMFYUI_PATH or put this repo in "
                  f"ComfyUI/custom_nodes to run the ComfyUI tier")


COMFYUI_PATH, COMFYUI_HOW = find_comfyui()


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
