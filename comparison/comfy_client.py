"""One ComfyUI server over its HTTP API (Python standard library only), for the multi-server compare.

``ComfyClient`` queues a prompt (``POST /prompt``), waits for it (``GET /history/<id>``), downloads its
files (``GET /view``), tells whether the server's queue is empty (``GET /queue``) and cancels a prompt
(``POST /queue`` delete, ``POST /interrupt``). ``inspect`` checks a server before a grid: reachable, every
node type of the grid's prompts registered (``/object_info/<class>``), every file named in a list input
(model files, input images) present in that server's list, and ComfyUI-Distributed installed or not.

Failures come in two kinds, so that the work queue (``fanout.py``) knows what to do with them:
``ServerDown`` (connection refused, HTTP 5xx, time-out, an answer that is not ComfyUI's) takes the
server out of the grid; ``CellError`` (ComfyUI rejected or failed this prompt) is the cell's, and the
cell is tried on another server.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from ..workflows.queue_workflow import _format_rejection

FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx", ".png", ".jpg", ".jpeg",
                 ".webp", ".latent", ".yaml", ".json")


class ServerDown(Exception):
    """The server is gone or broken for this grid: its unfinished cells go to the others."""


class CellError(Exception):
    """ComfyUI rejected or failed this prompt; another server may still run it."""


class Cancelled(Exception):
    """Ctrl-C: the grid stops."""


def normalize_url(url: str) -> str:
    """'127.0.0.1:8188' → 'http://127.0.0.1:8188' (no trailing slash)."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def short_name(url: str) -> str:
    """host:port of a server URL, for tables and the progress bar."""
    parsed = urllib.parse.urlsplit(url)
    return (parsed.netloc or url) + (parsed.path if parsed.path not in ("", "/") else "")


def brief(message: str) -> str:
    """A ServerDown message for a table: 'unreachable (Connection refused)', or its first line."""
    if message.startswith("cannot reach ComfyUI at "):
        return f"unreachable ({message.partition(' (')[2].partition('). ')[0]})"
    return message.splitlines()[0]


def unreachable_message(url: str, reason) -> str:
    return (f"cannot reach ComfyUI at {url} ({reason}). Is the server running? Start it with 'python main.py' in "
            f"your ComfyUI folder (add --listen to reach it from other machines), or leave it out of --server.")


class ComfyClient:
    def __init__(self, url: str, timeout: float = 600.0, poll: float = 0.02):
        self.url = normalize_url(url)
        self.name = short_name(self.url)
        self.timeout = timeout  # seconds one cell may take
        self.poll = poll

    # --------------------------------------------------------------------------------------------
    # HTTP
    # --------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body=None, timeout: float = 30.0) -> tuple[int, bytes]:
        """(status, body); HTTP error statuses are returned, a failed connection raises ServerDown."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e or type(e).__name__
            raise ServerDown(unreachable_message(self.url, reason)) from None

    def get_json(self, path: str, timeout: float = 30.0):
        status, body = self.request("GET", path, timeout=timeout)
        return self._json(status, body, path)

    def _json(self, status: int, body: bytes, path: str):
        if status >= 500:
            raise ServerDown(f"ComfyUI at {self.url} answered HTTP {status} on {path}: "
                             f"{body.decode('utf-8', 'replace').strip()[:300]}")
        if status != 200:
            raise ServerDown(f"{self.url} answered HTTP {status} on {path}: is it a ComfyUI server?")
        try:
            return json.loads(body.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServerDown(f"{self.url} answered, but not as a ComfyUI server (no JSON at {path})") from None

    # --------------------------------------------------------------------------------------------
    # one prompt
    # --------------------------------------------------------------------------------------------

    def submit(self, prompt: dict, client_id: str) -> str:
        """POST /prompt; the prompt id. A rejected prompt (HTTP 400) is a CellError with ComfyUI's message."""
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
        if status == 400:
            try:
                detail = _format_rejection(json.loads(body.decode("utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError):
                detail = body.decode("utf-8", "replace").strip()
            raise CellError(f"ComfyUI at {self.url} rejected the prompt (HTTP 400):\n{detail}")
        answer = self._json(status, body, "/prompt")
        prompt_id = answer.get("prompt_id") if isinstance(answer, dict) else None
        if not prompt_id:
            raise ServerDown(f"unexpected answer from {self.url}/prompt: {json.dumps(answer)[:300]}")
        return prompt_id

    def wait(self, prompt_id: str, stop: threading.Event | None = None) -> dict:
        """The history entry of ``prompt_id`` once it has run (CellError if it failed, ServerDown on time-out)."""
        deadline = time.monotonic() + self.timeout
        path = f"/history/{urllib.parse.quote(prompt_id)}"
        delay = self.poll
        while True:
            if stop is not None and stop.is_set():
                raise Cancelled()
            history = self.get_json(path)
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    raise CellError(f"ComfyUI at {self.url} failed to run the cell: {execution_error(status)}")
                if status.get("completed", True):
                    return entry
            if time.monotonic() > deadline:
                self.cancel(prompt_id)
                raise ServerDown(f"the cell did not finish within {self.timeout:.0f} s on {self.url} (raise "
                                 f"--timeout, or look at that server's console)")
            time.sleep(delay)
            delay = min(0.1, delay * 1.5)  # a GET of one history entry every 0.1 s costs the server nothing

    def download(self, item: dict) -> bytes:
        """A file of a history entry's outputs ({filename, subfolder, type}) through GET /view."""
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        status, body = self.request("GET", f"/view?{query}", timeout=60.0)
        if status >= 500:
            raise ServerDown(f"ComfyUI at {self.url} answered HTTP {status} for {item['filename']}")
        if status != 200:
            raise CellError(f"could not download {item['filename']} from {self.url} (HTTP {status})")
        return body

    def idle(self) -> bool:
        """Nothing running or waiting in the server's queue (this grid's or anybody's)."""
        queue = self.get_json("/queue")
        return not queue.get("queue_running") and not queue.get("queue_pending")

    def cancel(self, prompt_id: str) -> None:
        """Take ``prompt_id`` off the server's queue, or interrupt it if it runs; errors are ignored."""
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self.request("POST", path, body, timeout=5.0)
            except ServerDown:
                return

    # --------------------------------------------------------------------------------------------
    # the check before a grid
    # --------------------------------------------------------------------------------------------

    def distributed(self) -> str | None:
        """'ComfyUI-Distributed (N workers)' when the server has it (``GET /distributed/config``), else None."""
        try:
            status, body = self.request("GET", "/distributed/config", timeout=10.0)
            config = json.loads(body.decode("utf-8")) if status == 200 else None
        except (ServerDown, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(config, dict):
            return None
        workers = config.get("workers")
        count = len(workers) if isinstance(workers, (list, dict)) else 0
        return f"ComfyUI-Distributed ({count} worker{'s' if count != 1 else ''} configured)"

    def inspect(self, prompts: list[dict]) -> ServerCheck:
        """Reachable, node types registered, list inputs (model files) available: see ServerCheck."""
        check = ServerCheck(self.url)
        try:
            self.get_json("/system_stats", timeout=10.0)
        except ServerDown as e:
            check.unreachable = str(e)
            return check
        try:
            infos = {}
            for class_type in sorted({node["class_type"] for prompt in prompts for node in prompt.values()}):
                info = self.get_json(f"/object_info/{urllib.parse.quote(class_type)}")
                if class_type in info:
                    infos[class_type] = info[class_type]
                else:
                    check.missing_nodes.append(class_type)
            for problem in list_input_problems(prompts, infos):
                check.values.setdefault(problem[0], problem[1])
        except ServerDown as e:
            check.unreachable = str(e)
            return check
        check.note = self.distributed()
        return check


@dataclass
class ServerCheck:
    url: str
    unreachable: str | None = None
    missing_nodes: list[str] = field(default_factory=list)
    values: dict[tuple, str] = field(default_factory=dict)  # (class, input, value) → what is wrong
    note: str | None = None

    def reasons(self, ignore: set[tuple] = frozenset()) -> list[tuple[str, str]]:
        """(short, full) reasons this server cannot draw the grid; ``ignore``: list values that no server has
        (the prompt's own error: ComfyUI rejects it with its own message)."""
        if self.unreachable:
            return [(brief(self.unreachable), self.unreachable)]
        reasons = []
        if self.missing_nodes:
            pack = [n for n in self.missing_nodes if n.startswith("GuidanceKit_")]
            hint = ("install comfyui-guidance-kit into its custom_nodes and restart it" if pack else
                    "install the custom nodes that provide them and restart it")
            names = ", ".join(self.missing_nodes)
            reasons.append((f"node types not registered: {names}", f"node types not registered there: {names} "
                                                                    f"({hint})"))
        for (_, name, value), text in self.values.items():
            if (_, name, value) not in ignore:
                reasons.append((f"{text.partition(' (')[0]} missing ({name})", text))
        return reasons


def _options(spec) -> list | None:
    """The choices of a list (combo) input from /object_info, in the V1 or V3 form."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        return spec[1]["options"]
    return None


def list_input_problems(prompts: list[dict], infos: dict) -> list[tuple[tuple, str]]:
    """((class, input, value), message) for every list-input value that is not among the server's choices."""
    problems = []
    for prompt in prompts:
        for node_id, node in prompt.items():
            info = infos.get(node["class_type"])
            if info is None:
                continue
            specs = {**info.get("input", {}).get("optional", {}), **info.get("input", {}).get("required", {})}
            for name, value in node["inputs"].items():
                options = _options(specs.get(name))
                if options is None or isinstance(value, list) or value in options:
                    continue
                kind = "model file" if str(value).lower().endswith(FILE_SUFFIXES) else "value"
                shown = ", ".join(map(str, options[:8])) + (" ..." if len(options) > 8 else "") if options else "none"
                problems.append(((node["class_type"], name, value),
                                 f"{kind} {value!r} (node {node_id} {node['class_type']}, input {name!r}) is not on "
                                 f"this server (its choices: {shown}); copy the file into that server's models "
                                 f"folder, or leave the server out"))
    return problems


def execution_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type', 'error')}: "
                    f"{data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return f"interrupted on the server at node {data.get('node_id')} (Cancel in its editor, or /interrupt)"
    return json.dumps(status)[:500]
