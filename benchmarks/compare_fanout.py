"""Wall time of the default compare grid on one ComfyUI server vs two, measured in one run.

    python benchmarks/compare_fanout.py [--threads 1] [--repeat 1] [-- extra compare.py arguments]

Starts two ComfyUI servers on 127.0.0.1 with this pack (``main.py --cpu``, ``--threads`` torch/OpenMP threads
each, default 1), warms both up with a small grid, then draws ``python compare.py``'s default grid (8 method rows
× cfg 1, 3, 5, 8 on the embedded digits model, 10 samples × 10 digits per cell, 20 steps) with
``--server A`` and with ``--server A --server B``, ``--repeat`` times each, alternating, and prints the wall
times, each server's share and the ratio. The two grids are compared pixel for pixel. The servers are
stopped at the end. Needs a ComfyUI checkout (found as the test command finds it) and scikit-learn.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# isort: off
import tests.conftest  # noqa: E402  (registers the package as guidance_kit, finds ComfyUI)
# isort: on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(comfyui: Path, base: Path, threads: int) -> tuple[subprocess.Popen, str]:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-guidance-kit").symlink_to(REPO, target_is_directory=True)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = open(base / "server.log", "w")  # noqa: SIM115  (kept open while the server runs)
    process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                "--base-directory", str(base), "--disable-auto-launch", "--disable-all-custom-nodes",
                                "--whitelist-custom-nodes", "comfyui-guidance-kit", "--database-url",
                                "sqlite:///:memory:"], cwd=str(comfyui), stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, f"http://127.0.0.1:{port}"


def wait_for(process: subprocess.Popen, url: str, base: Path) -> None:
    deadline = time.monotonic() + 240
    while True:
        if process.poll() is not None:
            sys.exit(f"ComfyUI did not start: {(base / 'server.log').read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/object_info/GuidanceKit_DigitsModelLoader", timeout=5) as answer:
                if json.loads(answer.read()):
                    return
                sys.exit(f"the pack did not load on {url}: {(base / 'server.log').read_text(errors='replace')[-2000:]}")
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"ComfyUI did not answer on {url} within 240 s")
            time.sleep(0.5)


def compare_run(compare, argv: list[str]) -> tuple[float, str]:
    """compare.main in this process: (wall seconds, its standard output)."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compare.main(argv + ["--no-progress"])
    seconds = time.perf_counter() - start
    if code != 0:
        sys.exit(f"compare.py {' '.join(argv)} failed ({code}):\n{err.getvalue()}")
    return seconds, out.getvalue()


def shares(text: str) -> str:
    lines = text.split("\nServers:\n", 1)[1].splitlines()[2:]
    return ", ".join(f"{line.split()[0].rpartition(':')[2]}: {line.split()[1]} cells at {line.split()[2]} s"
                     for line in lines if line.startswith("http"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per server (default 1)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration, alternating (default 1)")
    parser.add_argument("extra", nargs="*", help="more compare.py arguments (after --), e.g. -- --steps 10")
    args = parser.parse_args()
    if tests.conftest.COMFYUI_PATH is None:
        sys.exit(tests.conftest.COMFYUI_HOW)
    import torch

    torch.set_num_threads(1)  # this process only measures the samples; the servers sample
    from guidance_kit import compare

    with tempfile.TemporaryDirectory(prefix="compare_fanout_") as root:
        started = [start_server(tests.conftest.COMFYUI_PATH, Path(root) / f"server{i}", args.threads)
                   for i in range(2)]
        try:
            for i, (process, url) in enumerate(started):
                wait_for(process, url, Path(root) / f"server{i}")
            urls = [url for _, url in started]
            warm = ["--rows", "cfg", "pag", "--scales", "3", "--samples", "2", "--digits", "0-1", "--steps", "2",
                    "--out", str(Path(root) / "warm.png")]
            compare_run(compare, ["--servers", ",".join(urls)] + warm)  # model loads, imports: out of the timing
            times: dict[int, list[float]] = {1: [], 2: []}
            texts = {}
            for _ in range(args.repeat):
                for count in (1, 2):
                    out = Path(root) / f"grid_{count}.png"
                    argv = [a for url in urls[:count] for a in ("--server", url)] + ["--out", str(out)] + args.extra
                    seconds, texts[count] = compare_run(compare, argv)
                    times[count].append(seconds)
                    print(f"{count} server{'s' if count > 1 else ' '}: {seconds:6.1f} s  ({shares(texts[count])})",
                          flush=True)
            from PIL import Image, ImageChops

            pictures = [Image.open(Path(root) / f"grid_{count}.png").convert("RGB") for count in (1, 2)]
            same = ImageChops.difference(*pictures).getbbox() is None
        finally:
            for process, _ in started:
                process.terminate()
            for process, _ in started:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    one, two = min(times[1]), min(times[2])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ndefault digits grid (32 cells), servers with {args.threads} thread{'s' if args.threads > 1 else ''} "
          f"each, {os.cpu_count()} CPU cores, load average at the end {load}; best of {args.repeat}")
    print(f"{'servers':<8}{'wall s':>8}")
    print(f"{'1':<8}{one:>8.1f}")
    print(f"{'2':<8}{two:>8.1f}")
    print(f"ratio 1 server / 2 servers: {one / two:.2f}×; grids pixel-identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
