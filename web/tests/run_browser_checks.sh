#!/usr/bin/env bash
# Browser checks of the schedule preview and the Annealing Guidance plot (web/tests/browser_check.mjs) against
# a real ComfyUI, for two frontends × two rendering modes:
#   pinned  the frontend ComfyUI pins (comfyui-frontend-package in its requirements.txt, installed in
#           the Python below; ComfyUI serves it when no --front-end-root is given)
#   newest  the newest 1.x comfyui-frontend-package on PyPI (pip install --target into the cache)
#   × classic (LiteGraph canvas) and vue ("Modern Node Design (Nodes 2.0)", Comfy.VueNodes.Enabled)
# One summary line per frontend × mode; exit status 1 if any check fails.
#
#   bash web/tests/run_browser_checks.sh [python]
#
# python: the Python that runs ComfyUI (with its requirements); default $PYTHON, then the pack's
# .venv/bin/python, then python3.
# Environment:
#   COMFYUI_PATH   ComfyUI checkout (default: the ComfyUI this pack sits in, then ~/ComfyUI)
#   CHROMIUM       Chromium binary (default /usr/bin/chromium; Debian: apt-get install -y chromium)
#   GK_WEB_CACHE   where playwright-core and the newest frontend go (default ~/.cache/guidance-kit-web)
#   GK_WEB_SHOTS   screenshots (default /tmp/gkweb-shots)
#   GK_WEB_REFRESH 1: look for a newer playwright-core / frontend now (otherwise once a day)
# Prints the single line "browser checks SKIPPED: <reason>" and exits 0 where the checks cannot run:
# no Chromium, no node, no ComfyUI or a Python without its requirements, or playwright-core / the
# newest frontend cannot be installed (no network) and are not in the cache yet.
set -uo pipefail

skip() {
  echo "browser checks SKIPPED: $*"
  exit 0
}

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
started=$SECONDS

python="${1:-${PYTHON:-}}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
command -v "$python" >/dev/null 2>&1 || skip "no Python '$python'"
# absolute (the servers run from the ComfyUI directory); a venv's python link is kept as it is
case "$python" in
  */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;;
  *) python="$(command -v "$python")" ;;
esac

chromium="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] || skip "no Chromium at $chromium (apt-get install -y chromium, or set CHROMIUM)"
command -v node >/dev/null 2>&1 || skip "node not found (install Node.js >= 20)"

comfyui=""
for candidate in "${COMFYUI_PATH:-}" "$(cd "$repo/../.." 2>/dev/null && pwd)" "$HOME/ComfyUI"; do
  if [ -n "$candidate" ] && [ -f "$candidate/main.py" ] && [ -f "$candidate/comfy/cli_args.py" ]; then
    comfyui="$(cd "$candidate" && pwd)"
    break
  fi
done
[ -n "$comfyui" ] || skip "no ComfyUI checkout (set COMFYUI_PATH)"
"$python" -c "import torch, aiohttp, comfyui_frontend_package" >/dev/null 2>&1 ||
  skip "$python lacks ComfyUI's requirements (torch, aiohttp, comfyui-frontend-package); run tests/run.sh first"

# the flags this ComfyUI's main.py knows (comfy/cli_args.py); --base-directory is needed
has_flag() { grep -q -- "\"$1\"" "$comfyui/comfy/cli_args.py"; }
has_flag --base-directory || skip "this ComfyUI has no --base-directory"
has_flag --front-end-root || skip "this ComfyUI has no --front-end-root (cannot serve the newest frontend)"
server_flags=(--cpu --listen 127.0.0.1)
has_flag --database-url && server_flags+=(--database-url "sqlite:///:memory:")
has_flag --disable-auto-launch && server_flags+=(--disable-auto-launch)

# --- tools, outside the repository -------------------------------------------------------------
cache="${GK_WEB_CACHE:-$HOME/.cache/guidance-kit-web}"
mkdir -p "$cache" || skip "cannot create $cache"
fresh() { # $1: stamp file; true when younger than a day and no refresh asked for
  [ "${GK_WEB_REFRESH:-0}" != 1 ] && [ -n "$(find "$1" -mmin -1440 2>/dev/null)" ]
}

playwright="$cache/node_modules/playwright-core"
if ! { [ -f "$playwright/package.json" ] && fresh "$cache/.playwright-stamp"; }; then
  if command -v npm >/dev/null 2>&1 &&
    npm install --prefix "$cache" --no-audit --no-fund --loglevel=error --fetch-retries=1 --fetch-timeout=60000 \
      playwright-core@1 >"$cache/npm.log" 2>&1; then
    touch "$cache/.playwright-stamp"
  elif [ ! -f "$playwright/package.json" ]; then
    skip "cannot install playwright-core into $cache (no network or no npm; see $cache/npm.log)"
  fi
fi

frontend="$cache/frontend-newest"
static="$frontend/comfyui_frontend_package/static"
if ! { [ -f "$static/index.html" ] && fresh "$cache/.frontend-stamp"; }; then
  if "$python" -m pip install --disable-pip-version-check -q --upgrade --no-deps --target "$frontend" \
    "comfyui-frontend-package>=1,<2" >"$cache/pip.log" 2>&1 && [ -f "$static/index.html" ]; then
    touch "$cache/.frontend-stamp"
  elif [ ! -f "$static/index.html" ]; then
    skip "cannot install the newest comfyui-frontend-package into $frontend (no network? see $cache/pip.log)"
  fi
fi
newest_version="$(sed -n 's/^Version: //p' "$frontend"/comfyui_frontend_package-*.dist-info/METADATA 2>/dev/null | head -1)"
pinned_version="$("$python" -c 'import importlib.metadata as m; print(m.version("comfyui-frontend-package"))' 2>/dev/null)"

# --- ComfyUI servers, one per frontend ----------------------------------------------------------
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
work="$(mktemp -d "${TMPDIR:-/tmp}/gk-browser-checks.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start_server() { # $1: name, then extra flags; sets port_<name>
  local name="$1" port base
  shift
  port="$(free_port)"
  base="$work/$name"
  mkdir -p "$base/custom_nodes"
  ln -s "$repo" "$base/custom_nodes/comfyui-guidance-kit"
  (cd "$comfyui" && exec "$python" main.py "${server_flags[@]}" --port "$port" --base-directory "$base" "$@") \
    >"$work/$name.log" 2>&1 &
  pids+=($!)
  printf -v "port_$name" %s "$port"
  printf -v "pid_$name" %s "$!"
}

wait_ready() { # $1: name; waits for /api/object_info to list the pack's nodes (while the server runs)
  local port_var="port_$1" pid_var="pid_$1"
  "$python" - "${!port_var}" "${!pid_var}" <<'EOF'
import json, os, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/object_info/GuidanceKit_CFGSchedule"
deadline = time.time() + 120
while time.time() < deadline:
    try:  # the server exited (a zombie until the script waits for it)
        os.kill(int(sys.argv[2]), 0)
        with open(f"/proc/{sys.argv[2]}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                sys.exit(1)
    except FileNotFoundError:
        pass
    except OSError:
        sys.exit(1)
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if "GuidanceKit_CFGSchedule" in json.load(r):
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
}

start_server pinned
start_server newest --front-end-root "$static"
for name in pinned newest; do
  if ! wait_ready "$name"; then
    echo "browser checks: ComfyUI ($name frontend) did not start; the end of its log:"
    tail -n 30 "$work/$name.log"
    exit 1
  fi
done

# --- the checks ---------------------------------------------------------------------------------
shots="${GK_WEB_SHOTS:-/tmp/gkweb-shots}"
mkdir -p "$shots"
limit=()
command -v timeout >/dev/null 2>&1 && limit=(timeout 150)
failed=0
for name in pinned newest; do
  port_var="port_$name"
  version_var="${name}_version"
  for mode in classic vue; do
    label="$name frontend ${!version_var:-?} / $mode"
    log="$work/check-$name-$mode.log"
    t0=$SECONDS
    PLAYWRIGHT_CORE="$playwright" "${limit[@]}" node "$here/browser_check.mjs" "http://127.0.0.1:${!port_var}" \
      --mode "$mode" --label "$name" --chromium "$chromium" \
      --out "$shots/preview-$name-$mode.png" --workflow-out "$shots/workflow-$name-$mode.png" >"$log" 2>&1
    status=$?
    if [ "$status" -eq 0 ]; then
      echo "browser check $label: PASS ($((SECONDS - t0)) s)"
    else
      failed=1
      echo "browser check $label: FAIL (exit $status, $((SECONDS - t0)) s)"
      grep -E '^  - |^ignored' "$log" | head -n 20
      [ "$status" -eq 124 ] && echo "  - timed out after 150 s"
      grep -q '^  - ' "$log" || tail -n 15 "$log"
    fi
  done
done
echo "browser checks: $((SECONDS - started)) s, screenshots in $shots"
exit "$failed"
