"""The multi-server compare's work queue (comparison/fanout.py) against small fake ComfyUI servers (no ComfyUI).

Each fake answers the HTTP API calls the queue makes (/system_stats, /object_info/<class>, /queue, /prompt,
/history/<id>, /interrupt, /distributed/config) and can misbehave on purpose: HTTP 5xx, a prompt it rejects,
a prompt that never finishes. The real servers are in tests/comfyui/test_compare_fanout.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from guidance_kit.comparison.fanout import FanOut, Job
from guidance_kit.workflows.queue_workflow import QueueError

NODES = {"Draw": {"input": {"required": {"value": ["INT", {}], "model": [["a.safetensors", "b.safetensors"], {}]}}}}


class Fake:
    """One fake ComfyUI server on 127.0.0.1; ``mode`` per behaviour, ``seen`` what it was asked."""

    def __init__(self, nodes=NODES, prompt_status=200, reject=(), hang=False, distributed=False, delay=0.02):
        self.nodes, self.prompt_status, self.reject, self.hang = nodes, prompt_status, set(reject), hang
        self.distributed, self.delay = distributed, delay
        self.history: dict[str, dict] = {}
        self.deleted, self.interrupted, self.drawn = [], [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = self.path
                if path == "/system_stats":
                    return self.reply(200, {"system": {}})
                if path.startswith("/object_info/"):
                    name = path.rpartition("/")[2]
                    return self.reply(200, {name: fake.nodes[name]} if name in fake.nodes else {})
                if path == "/queue":
                    return self.reply(200, {"queue_running": [], "queue_pending": []})
                if path.startswith("/history/"):
                    prompt_id = path.rpartition("/")[2]
                    entry = fake.history.get(prompt_id)
                    ready = entry is not None and not fake.hang and time.monotonic() >= entry["at"]
                    return self.reply(200, {prompt_id: entry["entry"]} if ready else {})
                if path == "/distributed/config" and fake.distributed:
                    return self.reply(200, {"workers": [{"id": "1"}, {"id": "2"}]})
                return self.reply(404, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/prompt":
                    if fake.prompt_status != 200:
                        return self.reply(fake.prompt_status, {"error": "broken"})
                    value = body["prompt"]["1"]["inputs"]["value"]
                    if value in fake.reject:
                        return self.reply(400, {"error": {"message": "Prompt outputs failed validation",
                                                          "details": f"value {value} refused"}, "node_errors": {}})
                    prompt_id = uuid.uuid4().hex
                    fake.drawn.append(value)
                    entry = {"status": {"status_str": "success", "completed": True, "messages": []},
                             "outputs": {"1": {"value": [value, fake.port]}}}
                    fake.history[prompt_id] = {"entry": entry, "at": time.monotonic() + fake.delay}
                    return self.reply(200, {"prompt_id": prompt_id, "number": 0, "node_errors": {}})
                if self.path == "/queue":
                    fake.deleted += body.get("delete", [])
                    return self.reply(200, {})
                if self.path == "/interrupt":
                    fake.interrupted.append(body.get("prompt_id"))
                    return self.reply(200, {})
                return self.reply(404, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes():
    made = []

    def make(**kwargs) -> Fake:
        made.append(Fake(**kwargs))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def jobs(values, model="a.safetensors") -> list[Job]:
    return [Job(f"cell {v}", {"1": {"class_type": "Draw", "inputs": {"value": v, "model": model}}},
                lambda client, entry: entry["outputs"]["1"]["value"]) for v in values]


def free_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def quiet_fanout(urls, **kwargs) -> tuple[FanOut, list[str]]:
    log: list[str] = []
    return FanOut(urls, progress=False, log=log.append, **kwargs), log


def test_cells_are_shared_and_keep_their_place(fakes):
    a, b = fakes(), fakes()
    fan, _ = quiet_fanout([a.url, b.url])
    outcome = fan.run(jobs(range(12)))
    assert [outcome.results[k][0][0] for k in range(12)] == list(range(12))  # the grid's order, whoever drew it
    assert a.drawn and b.drawn and sorted(a.drawn + b.drawn) == list(range(12))
    assert fan.stats[a.url[7:]].cells + fan.stats[b.url[7:]].cells == 12
    report = fan.report()
    assert a.url in report and b.url in report and "s/cell" in report


def test_a_server_answering_5xx_leaves_the_grid_and_its_cell_is_requeued(fakes):
    good, broken = fakes(), fakes(prompt_status=503)
    fan, log = quiet_fanout([broken.url, good.url])
    outcome = fan.run(jobs(range(6)))
    assert len(outcome.results) == 6 and not outcome.failures
    assert all(port == good.port for (_, port), _, _ in outcome.results.values())
    stats = fan.stats[broken.url[7:]]
    assert stats.lost and "HTTP 503" in stats.status and stats.requeued == 1
    assert any("lost" in line and broken.url in line for line in log)


def test_a_cell_rejected_on_every_server_fails_with_their_messages_and_the_rest_completes(fakes):
    a, b = fakes(reject={3}), fakes(reject={3})
    fan, _ = quiet_fanout([a.url, b.url])
    outcome = fan.run(jobs(range(6)))
    assert sorted(outcome.results) == [0, 1, 2, 4, 5]
    errors = outcome.failures[3]
    assert {server for server, _ in errors} == {a.url[7:], b.url[7:]}  # tried on both, then failed
    assert all("rejected the prompt" in message and "value 3 refused" in message for _, message in errors)
    assert not fan.stats[a.url[7:]].lost and not fan.stats[b.url[7:]].lost


def test_cells_refused_by_one_server_are_drawn_by_another(fakes):
    picky, other = fakes(reject=set(range(4))), fakes(delay=0.2)  # picky refuses every cell it is given
    fan, _ = quiet_fanout([picky.url, other.url])
    outcome = fan.run(jobs(range(4)))
    assert len(outcome.results) == 4 and all(port == other.port for (_, port), _, _ in outcome.results.values())
    stats = fan.stats[picky.url[7:]]
    assert stats.failures >= 1 and stats.requeued == stats.failures and not stats.lost  # still in the grid


def test_a_cell_past_the_timeout_gives_the_server_up_and_cancels_the_prompt_there(fakes):
    stuck, good = fakes(hang=True), fakes()
    fan, _ = quiet_fanout([stuck.url, good.url], timeout=0.5)
    outcome = fan.run(jobs(range(3)))
    assert len(outcome.results) == 3
    stats = fan.stats[stuck.url[7:]]
    assert stats.lost and "did not finish within" in stats.status
    assert stuck.deleted and stuck.deleted == stuck.interrupted  # taken off its queue / interrupted


def test_the_check_names_and_leaves_out_servers_and_detects_comfyui_distributed(fakes):
    fine = fakes(distributed=True)
    no_nodes = fakes(nodes={})
    no_file = fakes(nodes={"Draw": {"input": {"required": {"model": [["a.safetensors"], {}]}}}})
    gone = free_url()
    fan, log = quiet_fanout([fine.url, no_nodes.url, no_file.url, gone])
    usable = fan.check([job.prompt for job in jobs([0], model="b.safetensors")])
    assert [c.url for c in usable] == [fine.url]
    assert "node types not registered: Draw" in fan.stats[no_nodes.url[7:]].status
    assert "model file 'b.safetensors' missing (model)" in fan.stats[no_file.url[7:]].status
    assert "unreachable" in fan.stats[gone[7:]].status
    assert any(gone in line and "cannot reach ComfyUI" in line for line in log)
    assert fan.stats[fine.url[7:]].note == "ComfyUI-Distributed (2 workers configured)"
    assert "detected, not used" in fan.report()


def test_a_value_no_server_has_is_left_to_comfyui_and_no_server_at_all_is_an_error(fakes):
    a, b = fakes(), fakes()
    fan, _ = quiet_fanout([a.url, b.url])
    assert len(fan.check([job.prompt for job in jobs([0], model="c.safetensors")])) == 2  # the prompt's own error
    fan, _ = quiet_fanout([free_url(), free_url()])
    with pytest.raises(QueueError, match="no server can draw this grid") as error:
        fan.run(jobs([0]))
    assert error.value.exit_code == 3


def test_ctrl_c_takes_the_queued_prompts_off_the_servers_and_returns_what_is_done(fakes):
    slow = fakes(delay=30.0)
    fan, _ = quiet_fanout([slow.url])
    started = time.monotonic()
    wait = fan._next_event

    def ctrl_c_after_half_a_second(state):
        # Ctrl-C arrives while the queue's loop waits for the servers (raised there, as the signal handler would)
        if time.monotonic() - started > 0.5:
            raise KeyboardInterrupt
        return wait(state)

    fan._next_event = ctrl_c_after_half_a_second
    outcome = fan.run(jobs(range(3)))
    assert outcome.cancelled and not outcome.results and outcome.missing(3) == [0, 1, 2]
    assert slow.deleted == slow.interrupted and len(slow.deleted) == 1  # the one prompt it had queued
