#!/usr/bin/env bash
# The one test command (README, .ci/run): installs what the tests need into a virtual environment
# and runs both tiers. The ComfyUI tier runs when a ComfyUI checkout is found (COMFYUI_PATH, this
# repo inside ComfyUI/custom_nodes, or ~/ComfyUI: digits/comfy_setup.py) and is skipped with a visible
# reason otherwise.
#   bash tests/run.sh [pytest args...]
# Environment: GUIDANCE_KIT_VENV (default .venv), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${GUIDANCE_KIT_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

# Which ComfyUI (it decides the torch to install): the pack's discovery module, pure Python, so the bare
# venv's interpreter runs it (COMFYUI_PATH, the ComfyUI this pack sits in, ~/ComfyUI; it prints why not)
comfyui="$("$venv/bin/python" digits/comfy_setup.py)" || comfyui=""

if [ -n "$comfyui" ]; then
  echo "tests/run.sh: ComfyUI found at $comfyui: installing CPU-capable torch 2.14.1 + torchvision 0.29.1 and ComfyUI's requirements"
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$comfyui/requirements.txt" > "$venv/comfyui-requirements.txt"
  # requests: imported by ComfyUI's server.py (comfy_extras/nodes_images.py imports it) but not in its
  # requirements.txt; older transformers pulled it in, newer ones do not.
  "${pip[@]}" -r "$venv/comfyui-requirements.txt" -r requirements.txt -r tests/requirements.txt requests
  export COMFYUI_PATH="$comfyui"
else
  echo "tests/run.sh: no ComfyUI checkout found: installing CPU torch 2.13.0; the ComfyUI tier will be skipped"
  "${pip[@]}" torch==2.13.0 -r requirements.txt -r tests/requirements.txt
fi

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if command -v node >/dev/null 2>&1; then
  echo "tests/run.sh: web extension tests (node --test web/tests/)"
  node --test web/tests/
else
  echo "tests/run.sh: node not found: web extension tests SKIPPED (install Node.js >= 20 to run them)"
fi
# The schedule preview in a real browser: the pinned and the newest ComfyUI frontend, classic and Nodes 2.0
# mode (web/tests/run_browser_checks.sh; it says SKIPPED and why where Chromium, ComfyUI or the network is
# missing). GUIDANCE_KIT_BROWSER_CHECKS=0 leaves it out.
if [ "${GUIDANCE_KIT_BROWSER_CHECKS:-1}" != 0 ]; then
  if [ -n "$comfyui" ]; then
    COMFYUI_PATH="$comfyui" bash web/tests/run_browser_checks.sh "$venv/bin/python"
  else
    echo "browser checks SKIPPED: no ComfyUI checkout"
  fi
fi
exec "$venv/bin/python" -m pytest "$@"
