"""Where ComfyUI is, and how the pack is imported outside a running ComfyUI: the pack's one module for it.

Used by the test suite (``tests/conftest.py``, ``tests/comfyui/harness.py``), ``compare.py``,
``python -m digits.train`` and, as a script, by ``tests/run.sh`` and ``.ci/run``. Inside a running
ComfyUI none of it is needed: ComfyUI has imported the pack and ``comfy`` already.

* :func:`locate_comfyui` / :func:`find_comfyui` — the ComfyUI checkout: an explicit path (strict: a
  path that is not a checkout is an error, never replaced by another), then ``COMFYUI_PATH``, then the
  ComfyUI this pack sits in (``<ComfyUI>/custom_nodes/<pack>``, also through a symlinked pack folder:
  the logical path, from ``$PWD`` or this file's own path, when it resolves to the pack), then
  ``~/ComfyUI``.
* :func:`import_pack` — the pack folder as the package ``guidance_kit`` (the folder name may contain
  hyphens), without putting the folder on ``sys.path``.
* :func:`import_comfyui` — ComfyUI first on ``sys.path``, its argument parsing off, CPU mode when asked
  or when torch sees no accelerator.
* :func:`comfyui_module` — a top-level ComfyUI module (``nodes``) loaded by path, where the pack's own
  ``nodes/`` package would shadow it (pytest puts the pack folder on ``sys.path``).

Pure Python at import time (no torch, no ComfyUI), so the system Python runs it before any virtual
environment exists: ``python3 digits/comfy_setup.py [--comfyui PATH]`` prints the checkout, or says on
stderr where it looked and exits 1. Entry points outside the package load this file by path under the
name ``guidance_kit.digits.comfy_setup`` (it imports nothing of the pack), then call :func:`import_pack`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "guidance_kit"
PACK = Path(__file__).resolve().parent.parent  # the pack folder (real path)
CHECKOUT_FILES = ("comfy/samplers.py", "main.py")

_imported_from: Path | None = None  # the checkout import_comfyui put on sys.path


class ComfyUINotFound(RuntimeError):
    """No ComfyUI checkout was found; the message says where we looked and how to point at one."""


def is_comfyui(path: str | os.PathLike) -> bool:
    return all((Path(path) / name).is_file() for name in CHECKOUT_FILES)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def pack_locations() -> list[Path]:
    """The pack folder as reached by the user, then its real path (no duplicates).

    A pack folder that is a symlink in ``ComfyUI/custom_nodes`` resolves elsewhere; the logical path is
    known from ``$PWD`` (the shell's current folder, or one of its parents, when it resolves to the pack)
    or from this file's unresolved path (a script started through the link).
    """
    logical: list[Path] = []
    pwd = os.environ.get("PWD", "")
    if os.path.isabs(pwd):
        here = Path(os.path.normpath(pwd))
        logical += [p for p in (here, *here.parents) if p.name and _same_file(p, PACK)][:1]
    logical.append(Path(os.path.abspath(__file__)).parent.parent)
    locations: list[Path] = []
    for path in (*logical, PACK):
        if path not in locations:
            locations.append(path)
    return locations


def comfyui_candidates(explicit: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """(path, how it is chosen) in the order they are tried."""
    candidates = []
    if explicit:
        candidates.append((Path(explicit).expanduser(), "--comfyui"))
    env = os.environ.get("COMFYUI_PATH")
    if env:
        candidates.append((Path(env).expanduser(), "COMFYUI_PATH"))
    for pack in pack_locations():
        if pack.parent.name == "custom_nodes" and all(pack.parent.parent != p for p, _ in candidates):
            candidates.append((pack.parent.parent, "this pack is in ComfyUI/custom_nodes"))
    candidates.append((Path.home() / "ComfyUI", "~/ComfyUI"))
    return candidates


def locate_comfyui(explicit: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(the ComfyUI checkout to use, how it was chosen), or ComfyUINotFound naming every place looked at."""
    candidates = comfyui_candidates(explicit)
    if explicit and not is_comfyui(candidates[0][0]):
        # a path the user named is never silently replaced by another checkout
        raise ComfyUINotFound(
            f"Guidance Kit: --comfyui {candidates[0][0]} is not a ComfyUI checkout (no comfy/samplers.py and "
            f"main.py there). Point --comfyui at the ComfyUI folder, or leave it out to use COMFYUI_PATH, the "
            f"ComfyUI this pack sits in, or ~/ComfyUI.")
    for path, how in candidates:
        if is_comfyui(path):
            return Path(os.path.abspath(path)), how
    looked = ", ".join(f"{p} ({how})" for p, how in candidates)
    raise ComfyUINotFound(
        f"Guidance Kit: no ComfyUI checkout found (looked at {looked}). Install ComfyUI "
        f"(git clone https://github.com/comfyanonymous/ComfyUI), then pass --comfyui PATH, set COMFYUI_PATH, "
        f"or put this pack into ComfyUI/custom_nodes.")


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """The ComfyUI checkout to use, or ComfyUINotFound naming every place looked at."""
    return locate_comfyui(explicit)[0]


def import_pack(hide_folder: bool = False) -> ModuleType:
    """The pack folder as the package ``guidance_kit``; calling it again returns the same package.

    The folder itself is never put on ``sys.path`` (its ``nodes/`` would hide ComfyUI's ``nodes.py``).
    ``hide_folder`` also takes it off ``sys.path`` when the package is first imported: a script started
    from the folder (``python compare.py``) has it there first.
    """
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    if hide_folder:
        sys.path[:] = [p for p in sys.path if not _same_file(Path(p or "."), PACK)]
    spec = importlib.util.spec_from_file_location(PACKAGE, PACK / "__init__.py", submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(PACKAGE, None)
        raise
    if __name__.startswith(PACKAGE + ".") and sys.modules.get(__name__) is not None:
        # this file, loaded by path under its name in the package: link it into its parent package too
        parent, _, leaf = __name__.rpartition(".")
        setattr(importlib.import_module(parent), leaf, sys.modules[__name__])
    return module


def has_accelerator() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or (mps is not None and mps.is_available()))


def import_comfyui(explicit: str | os.PathLike | None = None, cpu: bool = False) -> Path:
    """Put ComfyUI first on ``sys.path`` and import ``comfy`` without parsing our command line.

    ``cpu`` forces ComfyUI's CPU mode (it must be decided before ``comfy.model_management`` loads); it
    is also chosen when torch sees no GPU, where ComfyUI would otherwise stop. Returns the checkout
    used. Calling it again is harmless.
    """
    global _imported_from
    loaded = sys.modules.get("comfy.model_management")
    if loaded is not None:
        return _imported_from or Path(loaded.__file__).parent.parent
    path = find_comfyui(explicit)
    if str(path) not in sys.path[:1]:
        # ComfyUI first: its top-level modules (nodes, folder_paths, ...) must win over this pack's folders
        sys.path.insert(0, str(path))
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        if cpu or not has_accelerator():
            comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
    except ImportError as e:
        raise ComfyUINotFound(
            f"Guidance Kit: ComfyUI at {path} could not be imported ({e}). Install its requirements into this "
            f"Python: {sys.executable} -m pip install -r {path / 'requirements.txt'}") from e
    _imported_from = path
    return path


def comfyui_module(name: str) -> ModuleType:
    """ComfyUI's top-level module ``name`` (e.g. ``nodes``), loaded from the checkout by path.

    Run from inside the pack (the documented layout, ``ComfyUI/custom_nodes/<pack>``), pytest puts the
    pack folder first on ``sys.path`` for every test module it collects, where the pack's ``nodes/``
    package hides ComfyUI's ``nodes.py``. Loading it by path once makes every later ``import nodes``
    ComfyUI's, whatever the order of ``sys.path``. Needs :func:`import_comfyui` first.
    """
    root = _imported_from
    if root is None:
        comfy = sys.modules.get("comfy")
        if comfy is None or not getattr(comfy, "__file__", None):
            raise RuntimeError(f"comfyui_module({name!r}): call import_comfyui() first")
        root = Path(comfy.__file__).parent.parent
    path = root / f"{name}.py"
    current = sys.modules.get(name)
    if current is not None and _same_file(Path(getattr(current, "__file__", "") or "."), path):
        return current
    if current is not None:
        raise RuntimeError(f"{name!r} was imported from {getattr(current, '__file__', current)} before ComfyUI's "
                           f"{path} was loaded")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python3 digits/comfy_setup.py",
                                     description="Print the ComfyUI checkout Guidance Kit uses (exit 1 if none).")
    parser.add_argument("--comfyui", default=None, help="an explicit checkout (an error if it is not one)")
    parser.add_argument("--how", action="store_true", help="also say how it was found (a second line)")
    args = parser.parse_args(argv)
    try:
        path, how = locate_comfyui(args.comfyui)
    except ComfyUINotFound as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    if args.how:
        print(how)
    return 0


if __name__ == "__main__":
    sys.exit(main())
