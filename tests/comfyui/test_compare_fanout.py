"""compare.py over several ComfyUI servers: two real ComfyUI servers started here on 127.0.0.1 with the pack,
one thread each. A grid split over both equals the grid of one; a server killed mid-grid leaves its cells to
the other (same images); an unreachable server, or one without a model file the workflow names, is named and
left out at start; Ctrl-C takes the queued cells off the servers and writes what is done; the digits rows and
the metrics report are drawn on the servers. The queue's fault handling in detail: tests/core/test_compare_fanout.py.
"""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COMFYUI_PATH, REPO

pytest.importorskip("sklearn", reason="scikit-learn provides the digits data set (pip install scikit-learn)")

from guidance_kit import compare  # noqa: E402

LORA = "guidance_kit_fanout.safetensors"  # present on the first server only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Servers:
    """Two ComfyUI servers (main.py --cpu, one thread) with this pack, on free ports; restarted when killed."""

    def __init__(self, root):
        import torch
        from safetensors.torch import save_file

        self.bases, self.ports, self.processes = [], [], [None, None]
        for i in range(2):
            base = root / f"server{i}"
            (base / "custom_nodes").mkdir(parents=True)
            (base / "custom_nodes" / "comfyui-guidance-kit").symlink_to(REPO, target_is_directory=True)
            (base / "models" / "loras").mkdir(parents=True)
            self.bases.append(base)
            self.ports.append(_free_port())
        save_file({"unused": torch.zeros(1)}, str(self.bases[0] / "models" / "loras" / LORA))
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]

    def start(self, i: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        with open(self.bases[i] / "server.log", "a") as log:
            self.processes[i] = subprocess.Popen(
                [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.ports[i]),
                 "--base-directory", str(self.bases[i]), "--disable-auto-launch", "--disable-all-custom-nodes",
                 "--whitelist-custom-nodes", "comfyui-guidance-kit", "--database-url", "sqlite:///:memory:"],
                cwd=str(COMFYUI_PATH), stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait(self, i: int, seconds: float = 240.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.processes[i].poll() is not None:
                pytest.fail(f"ComfyUI {i} did not start (exit {self.processes[i].returncode}): {self.log(i)}")
            try:
                _get(self.urls[i] + "/system_stats", 5.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI {i} did not answer on {self.urls[i]} within {seconds:.0f} s: {self.log(i)}")
                time.sleep(0.5)
        if not _get(self.urls[i] + "/object_info/GuidanceKit_DigitsModelLoader"):
            pytest.fail(f"the pack did not load in ComfyUI {i}: {self.log(i)}")

    def log(self, i: int) -> str:
        return (self.bases[i] / "server.log").read_text(errors="replace")[-2000:]

    def ensure(self) -> None:
        """Both servers up (one killed by a test is started again)."""
        dead = [i for i in range(2) if self.processes[i] is None or self.processes[i].poll() is not None]
        for i in dead:
            self.start(i)
        for i in dead:
            self.wait(i)

    def kill(self, i: int) -> None:
        self.processes[i].send_signal(signal.SIGKILL)
        self.processes[i].wait(timeout=30)

    def stop(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from guidance_kit.nodes import node_list

    if "GuidanceKit_DigitsModelLoader" not in {node.GET_SCHEMA().node_id for node in node_list()}:
        pytest.skip("the digits nodes are not registered: add nodes.digits_nodes.NODES to nodes/__init__.py")
    running = Servers(tmp_path_factory.mktemp("fanout"))
    try:
        running.ensure()
        yield running
    finally:
        running.stop()


@pytest.fixture
def up(servers):
    servers.ensure()
    return servers


def digits_workflow(steps: int = 6, batch: int = 4, lora: bool = False) -> dict:
    model = ["1", 0]
    prompt = {
        "1": {"class_type": "GuidanceKit_DigitsModelLoader", "inputs": {"digit": 3}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "3": {"class_type": "GuidanceKit_APG", "inputs": {"model": model, "eta": 0.0, "norm_threshold": 0.0,
                                                          "momentum": -0.5}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 0, "steps": steps, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["1", 1], "negative": ["1", 2],
                                                   "latent_image": ["2", 0], "denoise": 1.0}},
        "5": {"class_type": "GuidanceKit_DigitsDecode", "inputs": {"samples": ["4", 0], "scale": 4}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    if lora:  # strength 0: the file is named (so checked) but never read
        prompt["7"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": LORA,
                                                                       "strength_model": 0.0}}
        prompt["3"]["inputs"]["model"] = ["7", 0]
    return prompt


def grid_args(tmp_path, columns=("1", "3", "5", "8"), **workflow) -> list[str]:
    path = tmp_path / "digits.api.json"
    path.write_text(json.dumps(digits_workflow(**workflow)))
    return ["--workflow", str(path), "--set", "1.digit=7", "--row-set", "label=CFG 3.eta=1 3.momentum=0",
            "--row-set", "label=APG", "--scales", *columns, "--timeout", "120"]


def run_compare(argv, capsys) -> tuple[int, str, str]:
    code = compare.main(argv + ["--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_lines(text: str) -> dict[str, list[str]]:
    """The per-server report: URL → [cells, s/cell, failed, status...]."""
    lines = text.split("\nServers:\n", 1)[1].splitlines()[2:]
    return {line.split()[0]: line.split(maxsplit=4)[1:] for line in lines if line.startswith("http")}


def table(text: str) -> list[list[str]]:
    """The cell table without its seconds column."""
    body = text.split("\n\nsaved ", 1)[0].splitlines()[2:]
    return [line.split()[:-1] for line in body]


def same_pixels(a, b) -> bool:
    return np.array_equal(np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB")))


def test_a_grid_split_over_two_servers_is_the_grid_of_one(up, tmp_path, capsys):
    grid = grid_args(tmp_path)
    code, both, err = run_compare(["--server", up.urls[0], "--server", up.urls[1], *grid,
                                   "--out", str(tmp_path / "two.png")], capsys)
    assert code == 0, err
    counts = {url: int(line[0]) for url, line in report_lines(both).items()}
    assert counts[up.urls[0]] > 0 and counts[up.urls[1]] > 0 and sum(counts.values()) == 8, both
    code, one, err = run_compare(["--servers", up.urls[1], *grid, "--out", str(tmp_path / "one.png")], capsys)
    assert code == 0, err
    assert same_pixels(tmp_path / "two.png", tmp_path / "one.png")  # the picture names no server
    assert table(both) == table(one) and len(table(one)) == 8


def test_the_digits_rows_and_the_metrics_are_drawn_on_the_servers(up, tmp_path, capsys):
    rows = ["--rows", "cfg", "apg", "autoguidance", "cfgpp_2m", "--scales", "1", "4", "--samples", "2", "--digits",
            "0-1", "--steps", "3", "--threads", "1"]
    code, both, err = run_compare(["--servers", ",".join(up.urls), *rows, "--out", str(tmp_path / "two.png")], capsys)
    assert code == 0, err
    assert len(table(both)) == 8 and all(int(line[0]) > 0 for line in report_lines(both).values()), both
    code, one, err = run_compare(["--server", up.urls[0], *rows, "--out", str(tmp_path / "one.png")], capsys)
    assert code == 0, err
    assert same_pixels(tmp_path / "two.png", tmp_path / "one.png") and table(both) == table(one)
    apg = {line[2]: line[3:] for line in table(one) if line[0] == "APG"}
    cfg = {line[2]: line[3:] for line in table(one) if line[0] == "CFG"}
    assert apg["1"] == cfg["1"] and apg["4"] != cfg["4"]  # at cfg 1 APG has nothing to act on
    code, text, err = run_compare(["metrics", "--servers", ",".join(up.urls), "--methods", "cfg", "apg", "--scales",
                                   "1", "4", "--seeds", "0", "1", "--samples", "2", "--digits", "0-1", "--steps", "3",
                                   "--no-mixture", "--no-equal-strength", "--threads", "1"], capsys)
    assert code == 0, err
    assert "on ComfyUI servers" in text and "failed" not in text.split("Servers:")[0]
    assert sum(int(line[0]) for line in report_lines(text).values()) == 8


def test_an_unreachable_server_is_named_and_left_out(up, tmp_path, capsys):
    gone = f"http://127.0.0.1:{_free_port()}"
    code, text, err = run_compare(["--server", gone, "--server", up.urls[0], *grid_args(tmp_path, ("1", "5")),
                                   "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    assert f"leaving out {gone}: cannot reach ComfyUI" in err
    lines = report_lines(text)
    assert lines[gone][0] == "0" and "left out at start: unreachable" in lines[gone][3]
    assert lines[up.urls[0]][0] == "4"


def test_a_model_file_missing_on_one_server_is_reported_for_that_server(up, tmp_path, capsys):
    code, text, err = run_compare(["--server", up.urls[0], "--server", up.urls[1],
                                   *grid_args(tmp_path, ("1", "5"), lora=True), "--out", str(tmp_path / "g.png")],
                                  capsys)
    assert code == 0, err
    assert f"leaving out {up.urls[1]}: model file '{LORA}'" in err and "LoraLoaderModelOnly" in err
    lines = report_lines(text)
    assert lines[up.urls[0]][0] == "4" and lines[up.urls[1]][0] == "0"
    assert f"model file '{LORA}' missing (lora_name)" in lines[up.urls[1]][3]


def _when(condition, then, seconds: float = 60.0) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if condition():
                    then()
                    return
            except OSError:
                pass
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_cancels_the_queued_cells_and_writes_what_is_done(up, tmp_path, capsys, monkeypatch):
    from guidance_kit.comparison.fanout import FanOut

    record, pressed = FanOut._record, []

    def ctrl_c_after_the_first_cell(self, event, *args):
        record(self, event, *args)
        if event[0] == "done" and not pressed:
            pressed.append(True)
            raise KeyboardInterrupt  # as Ctrl-C (once), in the main thread's queue loop
    monkeypatch.setattr(FanOut, "_record", ctrl_c_after_the_first_cell)
    grid = grid_args(tmp_path, ("1", "2", "3", "5", "7", "9"), steps=10, batch=6)
    code, text, err = run_compare(["--servers", ",".join(up.urls), *grid, "--out", str(tmp_path / "g.png")], capsys)
    assert code == 130, err
    assert "cancelled" in err and (tmp_path / "g.png").is_file()
    states = [line[-1] for line in table(text)]
    assert "not run" in " ".join(text.split("\n\nsaved ")[0].splitlines()) and len(states) == 12
    for url in up.urls:  # nothing of this grid left running or waiting on the servers
        deadline = time.monotonic() + 10
        while (queue := _get(url + "/queue"))["queue_running"] and time.monotonic() < deadline:
            time.sleep(0.1)  # an interrupted prompt stops at its next step
        assert not queue["queue_running"] and not queue["queue_pending"], (url, queue)


def test_a_server_killed_mid_grid_leaves_its_cells_to_the_other(up, tmp_path, capsys):
    grid = grid_args(tmp_path, ("1", "2", "3", "5", "7", "9"), steps=10, batch=6)
    done_before = len(_get(up.urls[1] + "/history"))

    def b_is_drawing_its_second_cell():
        return (len(_get(up.urls[1] + "/history")) > done_before
                and _get(up.urls[1] + "/queue")["queue_running"])
    watcher = _when(b_is_drawing_its_second_cell, lambda: up.kill(1))
    code, text, err = run_compare(["--server", up.urls[0], "--server", up.urls[1], *grid,
                                   "--out", str(tmp_path / "two.png")], capsys)
    watcher.join(timeout=5)
    assert code == 0, err
    lines = report_lines(text)
    assert "lost after" in lines[up.urls[1]][3], text
    assert int(lines[up.urls[0]][0]) + int(lines[up.urls[1]][0]) == 12
    assert f"lost {up.urls[1]}" in err
    code, alone, err = run_compare(["--server", up.urls[0], *grid, "--out", str(tmp_path / "one.png")], capsys)
    assert code == 0, err
    assert same_pixels(tmp_path / "two.png", tmp_path / "one.png") and table(text) == table(alone)
