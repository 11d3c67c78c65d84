"""Queue an API-format workflow on a ComfyUI server, with overrides (Python standard library only).

    python workflows/queue_workflow.py workflows/api/apg_sdxl.api.json \\
        --server http://127.0.0.1:8188 --set 6.text="a red fox" --set 3.seed=42 --set 10.norm_threshold=10
    python workflows/queue_workflow.py workflows/api/fdg_sdxl.api.json --prompt "a lighthouse" --seed random

``--set NODE.INPUT=VALUE``: NODE is a node id, or a class type or title that names exactly one node; VALUE is
converted to the type of the value it replaces (int, float, bool, string; JSON for anything else). ``--prompt`` /
``--negative`` set the text of the prompt nodes wired (possibly through other conditioning nodes) to the sampler's
``positive`` / ``negative`` input; ``--seed`` sets the sampler's seed (``seed`` of a node with ``steps`` or
``sampler_name``, and every ``noise_seed``), ``--seed random`` a random one.

Exit codes: 0 queued, 1 the server rejected the prompt, 2 bad arguments or overrides, 3 server unreachable.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8188"
EXIT_REJECTED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
SEED_MAX = 2**64 - 1


class QueueError(Exception):
    """An error with a message for the user and the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------------------
# loading and overrides (no server needed)
# ------------------------------------------------------------------------------------------------

def load_prompt(path: str | Path) -> dict:
    """The API-format prompt in ``path``; a UI-format (editor) file is refused with a hint."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QueueError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise QueueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        twin = path.parent / "api" / f"{path.stem}.api.json"
        hint = f" (its API twin is {twin})" if twin.is_file() else " (export it with Workflow → Export (API))"
        raise QueueError(f"{path} is a UI workflow; /prompt needs the API format{hint}")
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, dict) and "class_type" in v and isinstance(v.get("inputs"), dict) for v in data.values()):
        raise QueueError(f"{path} is not an API-format workflow ({{node id: {{class_type, inputs}}}})")
    return data


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _describe(prompt: dict, node_id: str) -> str:
    node = prompt[node_id]
    title = node.get("_meta", {}).get("title")
    return f"{node_id} ({node['class_type']}{', ' + repr(title) if title and title != node['class_type'] else ''})"


def resolve_node(prompt: dict, ref: str) -> str:
    """A node id from an id, or a class type / title that names exactly one node (case-insensitive)."""
    if ref in prompt:
        return ref
    key = ref.strip().lower()
    matches = [i for i, n in prompt.items()
               if n["class_type"].lower() == key or str(n.get("_meta", {}).get("title", "")).lower() == key]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(_describe(prompt, i) for i in sorted(prompt, key=_id_key))
    if matches:
        raise QueueError(f"{ref!r} names several nodes ({', '.join(sorted(matches, key=_id_key))}); use the id. "
                         f"Nodes: {listing}")
    raise QueueError(f"no node {ref!r} in this workflow. Nodes: {listing}")


def _id_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def convert(raw: str, current, what: str):
    """``raw`` converted to the type of ``current`` (the value it replaces)."""
    try:
        if isinstance(current, bool):
            low = raw.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(current, int):
            try:
                return int(raw)  # exact, also for 64-bit seeds
            except ValueError:
                number = float(raw)  # "3.0" (a computed value) is 3
                if not number.is_integer():
                    raise ValueError(f"{raw} is not a whole number") from None
                return int(number)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, str):
            return raw
        return json.loads(raw)
    except ValueError as e:
        kind = type(current).__name__ if current is not None else "JSON"
        raise QueueError(f"{what}: cannot use {raw!r} as {kind} ({e})") from None


def parse_assignment(text: str) -> tuple[str, str, str]:
    """'NODE.INPUT=VALUE' → (NODE, INPUT, VALUE); the value may contain '=' and '.'."""
    target, sep, value = text.partition("=")
    node, dot, name = target.strip().rpartition(".")
    if not sep or not dot or not node or not name:
        raise QueueError(f"--set {text!r}: expected NODE.INPUT=VALUE, e.g. --set 3.seed=42 or --set 6.text=\"a fox\"")
    return node, name, value


def set_input(prompt: dict, node_ref: str, name: str, raw: str) -> tuple[str, object, object]:
    """Set one widget input in place; returns (node id, old value, new value)."""
    node_id = resolve_node(prompt, node_ref)
    inputs = prompt[node_id]["inputs"]
    what = f"node {_describe(prompt, node_id)} input {name!r}"
    if name not in inputs:
        widgets = [k for k, v in inputs.items() if not _is_link(v)]
        linked = [k for k, v in inputs.items() if _is_link(v)]
        raise QueueError(f"node {_describe(prompt, node_id)} has no input {name!r}; its inputs: "
                         f"{', '.join(widgets) or 'none'}" + (f" (linked: {', '.join(linked)})" if linked else ""))
    current = inputs[name]
    if _is_link(current):
        raise QueueError(f"{what} is connected to node {current[0]} (output {current[1]}), not a value; "
                         f"override that node's inputs instead")
    inputs[name] = convert(raw, current, what)
    return node_id, current, inputs[name]


def prompt_text_nodes(prompt: dict, which: str) -> list[str]:
    """Ids of the text-prompt nodes (a string 'text' input) upstream of every sampler's ``which`` input."""
    found, seen = [], set()
    stack = [v[0] for n in prompt.values() for k, v in n["inputs"].items() if k == which and _is_link(v)]
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id not in prompt:
            continue
        seen.add(node_id)
        inputs = prompt[node_id]["inputs"]
        if isinstance(inputs.get("text"), str):
            found.append(node_id)
            continue
        stack += [v[0] for v in inputs.values() if _is_link(v)]  # through FluxGuidance, ConditioningCombine, ...
    return sorted(found, key=_id_key)


def seed_inputs(prompt: dict) -> list[tuple[str, str]]:
    """(node id, input) of the sampler seeds: 'noise_seed' anywhere, 'seed' on nodes with steps/sampler_name."""
    out = []
    for node_id in sorted(prompt, key=_id_key):
        inputs = prompt[node_id]["inputs"]
        for name in ("noise_seed", "seed"):
            value = inputs.get(name)
            if value is None or _is_link(value) or isinstance(value, bool) or not isinstance(value, int):
                continue
            if name == "seed" and not ({"steps", "sampler_name"} & set(inputs)):
                continue  # e.g. a perturbation node's own seed
            out.append((node_id, name))
    return out


def apply_overrides(prompt: dict, sets: list[str] = (), positive: str | None = None, negative: str | None = None,
                    seed: str | int | None = None) -> tuple[dict, list[str]]:
    """A copy of ``prompt`` with the overrides applied, and one line per change."""
    prompt = copy.deepcopy(prompt)
    changes = []
    for which, text in (("positive", positive), ("negative", negative)):
        if text is None:
            continue
        targets = prompt_text_nodes(prompt, which)
        if not targets:
            raise QueueError(f"--{'prompt' if which == 'positive' else 'negative'}: no text prompt node is wired to a "
                             f"'{which}' input in this workflow; use --set NODE.text=...")
        for node_id in targets:
            prompt[node_id]["inputs"]["text"] = text
            changes.append(f"{_describe(prompt, node_id)}.text = {text!r}")
    if seed is not None:
        if str(seed).strip().lower() == "random":
            value = random.randint(0, 2**53)
        else:
            try:
                value = int(seed)
            except ValueError:
                raise QueueError(f"--seed {seed!r}: expected an integer or 'random'") from None
            if not 0 <= value <= SEED_MAX:
                raise QueueError(f"--seed {value}: must be between 0 and {SEED_MAX}")
        targets = seed_inputs(prompt)
        if not targets:
            raise QueueError("--seed: no sampler seed (KSampler seed / RandomNoise noise_seed) in this workflow")
        for node_id, name in targets:
            prompt[node_id]["inputs"][name] = value
            changes.append(f"{_describe(prompt, node_id)}.{name} = {value}")
    for assignment in sets:
        node_ref, name, raw = parse_assignment(assignment)
        node_id, _, new = set_input(prompt, node_ref, name, raw)
        changes.append(f"{_describe(prompt, node_id)}.{name} = {new!r}")
    return prompt, changes


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------

def _format_rejection(body: dict) -> str:
    lines = []
    error = body.get("error")
    if isinstance(error, dict):
        lines.append(f"{error.get('message', 'error')}" + (f": {error['details']}" if error.get("details") else ""))
    elif error:
        lines.append(str(error))
    for node_id, info in (body.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type', '?')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or json.dumps(body)


def post_prompt(server: str, prompt: dict, client_id: str, timeout: float = 30.0) -> dict:
    """POST /prompt; returns the server's JSON answer (prompt_id, number, node_errors)."""
    url = server.rstrip("/") + "/prompt"
    data = json.dumps({"prompt": prompt, "client_id": client_id}).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace")
        try:
            detail = _format_rejection(json.loads(text))
        except json.JSONDecodeError:
            detail = text.strip() or e.reason
        raise QueueError(f"ComfyUI at {server} rejected the prompt (HTTP {e.code}):\n{detail}", EXIT_REJECTED) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise QueueError(f"cannot reach ComfyUI at {server} ({reason}). Is the server running? Start it with "
                         f"'python main.py' in your ComfyUI folder, or pass --server URL.", EXIT_UNREACHABLE) from None
    except json.JSONDecodeError:
        raise QueueError(f"{url} did not answer with JSON: is {server} a ComfyUI server?", EXIT_REJECTED) from None


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Queue an API-format workflow on a ComfyUI server, with overrides.",
        epilog="Exit codes: 0 queued, 1 rejected by the server, 2 bad arguments/overrides, 3 server unreachable.")
    parser.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/apg_sdxl.api.json)")
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI address (default {DEFAULT_SERVER})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input; NODE is an id or a unique class type/title; repeatable")
    parser.add_argument("--prompt", help="text of the positive prompt node(s)")
    parser.add_argument("--negative", help="text of the negative prompt node(s)")
    parser.add_argument("--seed", help="sampler seed (an integer, or 'random')")
    parser.add_argument("--client-id", default=None, help="client id for the websocket (default: a random one)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    parser.add_argument("--dry-run", action="store_true", help="print the final prompt JSON instead of posting it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompt = load_prompt(args.workflow)
        prompt, changes = apply_overrides(prompt, args.sets, args.prompt, args.negative, args.seed)
        for line in changes:
            print(f"set {line}", file=sys.stderr)
        if args.dry_run:
            print(json.dumps(prompt, indent=2, ensure_ascii=False))
            return 0
        answer = post_prompt(args.server, prompt, args.client_id or uuid.uuid4().hex, args.timeout)
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    prompt_id = answer.get("prompt_id")
    if not prompt_id:
        print(f"error: unexpected answer from {args.server}: {json.dumps(answer)}", file=sys.stderr)
        return EXIT_REJECTED
    print(f"queued {Path(args.workflow).name} on {args.server}"
          + (f" (queue position {answer['number']})" if "number" in answer else "") + "; prompt_id:", file=sys.stderr)
    print(prompt_id)  # alone on stdout, for scripts: id=$(python queue_workflow.py ...)
    return 0


if __name__ == "__main__":
    sys.exit(main())
