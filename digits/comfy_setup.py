"""Find and import ComfyUI for the pack's own scripts (compare, training), outside a running ComfyUI.

ComfyUI is looked for as the tests do: ``COMFYUI_PATH``, the ComfyUI this pack sits in
(``ComfyUI/custom_nodes/<pack>``), then ``~/ComfyUI``. Inside a running ComfyUI (the loader
node) nothing here is needed: ``comfy`` is already importable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class ComfyUINotFound(RuntimeError):
    """No ComfyUI checkout was found; the message says where we looked and how to point at one."""


def comfyui_candidates(explicit: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    candidates = []
    if explicit:
        candidates.append((Path(explicit).expanduser(), "--comfyui"))
    env = os.environ.get("COMFYUI_PATH")
    if env:
        candidates.append((Path(env).expanduser(), "COMFYUI_PATH"))
    if REPO.parent.name == "custom_nodes":
        candidates.append((REPO.parent.parent, "this pack is in ComfyUI/custom_nodes"))
    candidates.append((Path.home() / "ComfyUI", "~/ComfyUI"))
    return candidates


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "samplers.py").is_file() and (path / "main.py").is_file()


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """The ComfyUI checkout to use, or ComfyUINotFound naming every place looked at."""
    candidates = comfyui_candidates(explicit)
    if explicit and not is_comfyui(candidates[0][0]):
        # a path the user named is never silently replaced by another checkout
        raise ComfyUINotFound(
            f"Guidance Kit: --comfyui {candidates[0][0]} is not a ComfyUI checkout (no comfy/samplers.py and "
            f"main.py there). Point --comfyui at the ComfyUI folder, or leave it out to use COMFYUI_PATH, the "
            f"ComfyUI this pack sits in, or ~/ComfyUI.")
    for path, _how in candidates:
        if is_comfyui(path):
            return path.resolve()
    looked = ", ".join(f"{p} ({how})" for p, how in candidates)
    raise ComfyUINotFound(
        f"Guidance Kit: no ComfyUI checkout found (looked at {looked}). Install ComfyUI "
        f"(git clone https://github.com/comfyanonymous/ComfyUI), then pass --comfyui PATH, set COMFYUI_PATH, "
        f"or put this pack into ComfyUI/custom_nodes.")


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
    loaded = sys.modules.get("comfy.model_management")
    if loaded is not None:
        return Path(loaded.__file__).resolve().parent.parent
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
    return path
