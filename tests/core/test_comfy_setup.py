"""digits/comfy_setup.py: where ComfyUI is found and how the pack is imported (pure Python, fake checkouts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, comfy_setup

PACK_NAME = "comfyui-guidance-kit"
SETUP = REPO / "digits" / "comfy_setup.py"


def fake_comfyui(path: Path) -> Path:
    (path / "comfy").mkdir(parents=True)
    (path / "comfy" / "samplers.py").write_text("")
    (path / "main.py").write_text("")
    (path / "custom_nodes").mkdir()
    return path


IN_CUSTOM_NODES = REPO.parent.name == "custom_nodes"  # the documented layout: that ComfyUI is always found


@pytest.fixture
def env(tmp_path, monkeypatch):
    """No COMFYUI_PATH, an empty home, and a current folder outside the pack."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PWD", str(tmp_path))
    (tmp_path / "home").mkdir()
    return tmp_path


@pytest.fixture
def outside(env, monkeypatch):
    """As ``env``, with the pack seen outside any ComfyUI (whichever layout this checkout is in)."""
    monkeypatch.setattr(comfy_setup, "pack_locations", lambda: [env / "packs" / PACK_NAME])
    return env


def test_the_order_explicit_then_comfyui_path_then_home(outside, monkeypatch):
    env = outside
    home = fake_comfyui(env / "home" / "ComfyUI")
    assert comfy_setup.locate_comfyui() == (home, "~/ComfyUI")
    other = fake_comfyui(env / "other")
    monkeypatch.setenv("COMFYUI_PATH", str(other))
    assert comfy_setup.locate_comfyui() == (other, "COMFYUI_PATH")
    third = fake_comfyui(env / "third")
    assert comfy_setup.locate_comfyui(third) == (third, "--comfyui")


def test_an_explicit_path_is_strict(env, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(fake_comfyui(env / "valid")))
    with pytest.raises(comfy_setup.ComfyUINotFound, match="is not a ComfyUI checkout"):
        comfy_setup.locate_comfyui(env / "nowhere")


def test_an_invalid_comfyui_path_falls_through_and_nothing_found_says_where_it_looked(outside, monkeypatch):
    env = outside
    monkeypatch.setenv("COMFYUI_PATH", str(env / "nowhere"))
    with pytest.raises(comfy_setup.ComfyUINotFound, match="no ComfyUI checkout found") as e:
        comfy_setup.locate_comfyui()
    assert f"{env / 'nowhere'} (COMFYUI_PATH)" in str(e.value) and "~/ComfyUI" in str(e.value)
    home = fake_comfyui(env / "home" / "ComfyUI")
    assert comfy_setup.find_comfyui() == home


def test_the_comfyui_a_symlinked_pack_sits_in_is_found_from_the_logical_path(env, monkeypatch):
    comfyui = fake_comfyui(env / "ComfyUI")
    link = comfyui / "custom_nodes" / PACK_NAME
    link.symlink_to(REPO, target_is_directory=True)
    fake_comfyui(env / "home" / "ComfyUI")  # found only after the ComfyUI the pack sits in
    monkeypatch.setenv("PWD", str(link / "tests"))  # the shell's logical folder, inside the linked pack
    assert comfy_setup.locate_comfyui() == (comfyui, "this pack is in ComfyUI/custom_nodes")
    monkeypatch.setenv("COMFYUI_PATH", str(fake_comfyui(env / "other")))
    assert comfy_setup.find_comfyui() == env / "other"  # COMFYUI_PATH first


def test_a_logical_folder_that_is_not_the_pack_is_ignored(env, monkeypatch):
    comfyui = fake_comfyui(env / "ComfyUI")
    elsewhere = comfyui / "custom_nodes" / "another-pack"
    elsewhere.mkdir()
    monkeypatch.setenv("PWD", str(elsewhere))
    assert comfyui not in [p for p, _ in comfy_setup.comfyui_candidates()]


def run_setup(args, cwd, env):
    return subprocess.run([sys.executable, str(SETUP), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=60)


def test_the_command_line_used_by_the_shell_scripts(env):
    """tests/run.sh and .ci/run run the file with a bare Python (before the venv has anything)."""
    comfyui = fake_comfyui(env / "ComfyUI")
    link = comfyui / "custom_nodes" / PACK_NAME
    link.symlink_to(REPO, target_is_directory=True)
    base = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    base["HOME"] = str(env / "home")
    result = run_setup(["--how"], link, dict(base, PWD=str(link)))  # as a shell started in the linked folder
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(comfyui), "this pack is in ComfyUI/custom_nodes"]
    if not IN_CUSTOM_NODES:
        result = run_setup([], env, dict(base, PWD=str(env)))
        assert result.returncode == 1 and result.stdout == ""
        assert "no ComfyUI checkout found" in result.stderr
    result = run_setup(["--comfyui", str(env / "nowhere")], env, dict(base, PWD=str(env), COMFYUI_PATH=str(comfyui)))
    assert result.returncode == 1 and "is not a ComfyUI checkout" in result.stderr


def test_import_pack_from_a_folder_with_hyphens_keeps_the_folder_off_sys_path(tmp_path):
    link = tmp_path / PACK_NAME
    link.symlink_to(REPO, target_is_directory=True)
    code = f"""
import importlib.util, sys
from pathlib import Path
name = "guidance_kit.digits.comfy_setup"
spec = importlib.util.spec_from_file_location(name, {str(link / "digits" / "comfy_setup.py")!r})
sys.modules[name] = setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
sys.path.insert(0, {str(link)!r})  # as a script started from the folder has it
package = setup.import_pack(hide_folder=True)
assert package is sys.modules["guidance_kit"] and package is setup.import_pack()
assert Path(package.__file__).resolve() == Path({str(REPO / "__init__.py")!r})
import guidance_kit.digits.comfy_setup as again
assert again is setup, "one module, not two copies"
assert all(Path(p or ".").resolve() != setup.PACK for p in sys.path), sys.path
assert "torch" not in sys.modules and "comfy" not in sys.modules, "pure Python until ComfyUI is imported"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
