"""The work queue of a compare over several ComfyUI servers (``compare.py --server A --server B``).

Every grid cell is one self-contained prompt: its seed, cfg and overrides are fixed before any server
sees it, so whichever server draws a cell draws the same pixels (given the same ComfyUI, pack,
models and device). One worker thread per server takes the next cell only when that server's queue
is empty (``GET /queue``: nothing of this grid's nor anybody else's), queues it (``POST /prompt``),
waits for it (``/history``) and downloads its result. The grid's layout is the job list's order,
whoever drew a cell.

Faults (``comfy_client.py`` sorts them):

* a server that goes away (connection refused, HTTP 5xx, a cell past ``--timeout``) leaves the grid:
  its unfinished cell goes back to the front of the queue for the other servers;
* a prompt ComfyUI rejects or fails (``CellError``) is tried on every other server before it counts as
  failed; a failed cell is reported with each server's message and the rest of the grid completes;
* Ctrl-C takes this grid's queued prompts off the servers (``/queue`` delete, ``/interrupt``) and
  returns what is done.

Before the first cell each server is checked (``ComfyClient.inspect``): reachable, the prompts' node
types registered, their list inputs (model files) present; a server that fails is named and left out.
A list value that no server has is the prompt's own error, not a server's: ComfyUI then rejects the
cells with its own message.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from ..workflows.queue_workflow import EXIT_UNREACHABLE, EXIT_USAGE, QueueError
from .comfy_client import Cancelled, CellError, ComfyClient, ServerDown, brief, normalize_url
from .grid import Cell


@dataclass
class Job:
    """One grid cell: the prompt, and how to read its result from the history entry (downloads)."""

    label: str
    prompt: dict
    collect: Callable[[ComfyClient, dict], object]


@dataclass
class ServerStats:
    url: str
    name: str
    cells: int = 0
    seconds: list[float] = field(default_factory=list)
    failures: int = 0
    requeued: int = 0
    status: str = "ok"
    note: str | None = None

    @property
    def lost(self) -> bool:
        return not self.status.startswith("ok")


@dataclass
class Outcome:
    """results: job index → (value, seconds, server); failures: job index → [(server, message)]."""

    results: dict[int, tuple[object, float, str]]
    failures: dict[int, list[tuple[str, str]]]
    cancelled: bool
    seconds: float

    def missing(self, count: int) -> list[int]:
        return [k for k in range(count) if k not in self.results and k not in self.failures]


class _State:
    def __init__(self, jobs: list[Job], names: list[str]):
        self.jobs = jobs
        self.cond = threading.Condition()
        self.pending = list(range(len(jobs)))
        self.tried: dict[int, set[str]] = {k: set() for k in range(len(jobs))}
        self.errors: dict[int, list[tuple[str, str]]] = {k: [] for k in range(len(jobs))}
        self.alive = set(names)
        self.in_flight: dict[str, list] = {}  # server name → [job index, prompt id or None]
        self.results: dict[int, tuple[object, float, str]] = {}
        self.failed: dict[int, list[tuple[str, str]]] = {}
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()

    # all under self.cond
    def open_for(self, name: str) -> int | None:
        return next((k for k in self.pending if name not in self.tried[k]), None)

    def finished(self) -> bool:
        return not self.pending and not self.in_flight

    def retry_or_fail(self, k: int, name: str, message: str) -> None:
        self.tried[k].add(name)
        self.errors[k].append((name, message))
        if any(server not in self.tried[k] for server in self.alive):
            self.pending.insert(0, k)  # the grid's order otherwise: a retried cell goes first
            self.events.put(("requeued", name, k))
        else:
            self.failed[k] = list(self.errors[k])
            self.events.put(("failed", name, k))

    def settle(self) -> None:
        """Pending cells that no server left can try have failed."""
        for k in list(self.pending):
            if not any(server not in self.tried[k] for server in self.alive):
                self.pending.remove(k)
                self.failed[k] = list(self.errors[k]) or [("", "no server left to run it")]
                self.events.put(("failed", "", k))


class FanOut:
    """A compare's servers: check them, run jobs over them, report each server's share."""

    def __init__(self, urls: list[str], timeout: float = 600.0, progress: bool = True, description: str = "compare",
                 log: Callable[[str], None] | None = None):
        urls = list(dict.fromkeys(normalize_url(u) for u in urls))
        if not urls:
            raise QueueError("compare: no server given (--server URL, repeatable, or --servers URL,URL)")
        self.clients = [ComfyClient(url, timeout) for url in urls]
        self.stats = {c.name: ServerStats(c.url, c.name) for c in self.clients}
        self.progress, self.description = progress, description
        self.log = log or self._stderr
        self._bar = None
        self.client_id = f"guidance-kit-compare-{uuid.uuid4().hex[:12]}"

    def _stderr(self, text: str) -> None:
        if self._bar is not None:  # a line above the progress bar, not through it
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    @property
    def usable(self) -> list[ComfyClient]:
        return [c for c in self.clients if not self.stats[c.name].lost]

    # --------------------------------------------------------------------------------------------
    # the check at start
    # --------------------------------------------------------------------------------------------

    def check(self, prompts: list[dict]) -> list[ComfyClient]:
        """The servers that can draw these prompts; the others are named, left out, and noted in the report."""
        candidates = self.usable
        with ThreadPoolExecutor(max_workers=max(1, len(candidates))) as pool:
            checks = list(pool.map(lambda c: c.inspect(prompts), candidates))
        reachable = [c for c in checks if not c.unreachable]
        nowhere = set.intersection(*(set(c.values) for c in reachable)) if reachable else set()
        usable, reasons = [], []
        for client, check in zip(candidates, checks):
            stats = self.stats[client.name]
            stats.note = check.note
            problems = check.reasons(ignore=nowhere)
            if problems:
                stats.status = "left out at start: " + "; ".join(short for short, _ in problems)
                reasons.append((client.url, [full for _, full in problems], bool(check.unreachable)))
                self.log(f"compare: leaving out {client.url}: " + "; ".join(full for _, full in problems))
            else:
                usable.append(client)
                if check.note:
                    self.log(f"compare: {client.url} runs {check.note}; its cells still go through /prompt "
                             f"(/distributed/queue runs a prompt without distributed nodes on that server alone)")
        if not usable:
            listing = "\n".join(f"  {url}: {'; '.join(problems)}" for url, problems, _ in reasons)
            code = EXIT_UNREACHABLE if all(unreachable for _, _, unreachable in reasons) else EXIT_USAGE
            if len(reasons) == 1:
                raise QueueError(f"compare: {reasons[0][1][0]}" if reasons[0][2] else
                                 f"compare: {reasons[0][0]} cannot draw this grid: {'; '.join(reasons[0][1])}", code)
            raise QueueError(f"compare: no server can draw this grid:\n{listing}", code)
        return usable

    # --------------------------------------------------------------------------------------------
    # the queue
    # --------------------------------------------------------------------------------------------

    def run(self, jobs: list[Job]) -> Outcome:
        """Every job on the usable servers; Ctrl-C cancels the queued prompts and returns what is done."""
        start = time.perf_counter()
        usable = self.check([job.prompt for job in jobs])
        if len(self.clients) > 1 or len(usable) > 1:
            self.log(f"compare: {len(jobs)} cells on {len(usable)} server{'s' if len(usable) > 1 else ''}: "
                     f"{', '.join(c.name for c in usable)}")
        state = _State(jobs, [c.name for c in usable])
        threads = [threading.Thread(target=self._worker, args=(client, state), daemon=True,
                                    name=f"compare-{client.name}") for client in usable]
        from .report import progress_bar

        bar = self._bar = progress_bar(len(jobs), self.description, self.progress)
        cancelled = False
        try:
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads) or not state.events.empty():
                event = self._next_event(state)
                if event is not None:
                    self._record(event, state, bar, usable)
        except KeyboardInterrupt:
            cancelled = True
            self._cancel(state, usable, threads)
            self.log(f"compare: cancelled; {len(state.results)} of {len(jobs)} cells done")
        finally:
            if bar is not None:
                bar.close()
            self._bar = None
        with state.cond:
            if not cancelled:
                state.settle()
            results, failed = dict(state.results), dict(state.failed)
        return Outcome(results, failed, cancelled, time.perf_counter() - start)

    @staticmethod
    def _next_event(state: _State):
        """The next worker event, or None after a short wait (Ctrl-C lands in the main thread's loop here)."""
        try:
            return state.events.get(timeout=0.2)
        except queue.Empty:
            return None

    def _worker(self, client: ComfyClient, state: _State) -> None:
        name = client.name
        while True:
            with state.cond:
                while True:
                    if state.stop.is_set() or name not in state.alive or state.finished():
                        return
                    if state.open_for(name) is not None:
                        break
                    state.cond.wait(0.5)
            try:
                if not client.idle():  # somebody else's prompts: let a free server take the cell
                    time.sleep(0.25)
                    continue
            except ServerDown as e:
                self._lose(client, state, None, str(e))
                return
            with state.cond:
                k = state.open_for(name)
                if k is None or state.stop.is_set():
                    continue
                state.pending.remove(k)
                state.in_flight[name] = [k, None]
            job = state.jobs[k]
            try:
                begin = time.perf_counter()
                prompt_id = client.submit(job.prompt, self.client_id)
                with state.cond:
                    state.in_flight[name][1] = prompt_id
                if state.stop.is_set():
                    client.cancel(prompt_id)
                    return
                value = job.collect(client, client.wait(prompt_id, state.stop))
                seconds = time.perf_counter() - begin
            except Cancelled:
                return
            except ServerDown as e:
                self._lose(client, state, k, str(e))
                return
            except Exception as e:  # CellError, or a result that cannot be read: the cell's, on this server
                message = str(e) if isinstance(e, CellError) else f"{client.url}: {type(e).__name__}: {e}"
                with state.cond:
                    state.in_flight.pop(name, None)
                    state.events.put(("error", name, k, message))
                    state.retry_or_fail(k, name, message)
                    state.cond.notify_all()
                continue
            with state.cond:
                state.in_flight.pop(name, None)
                state.results[k] = (value, seconds, name)
                state.events.put(("done", name, k, seconds))
                state.cond.notify_all()

    def _lose(self, client: ComfyClient, state: _State, k: int | None, message: str) -> None:
        with state.cond:
            state.alive.discard(client.name)
            state.in_flight.pop(client.name, None)
            state.events.put(("lost", client.name, k, message))
            if k is not None:
                state.retry_or_fail(k, client.name, message)
            state.settle()
            state.cond.notify_all()

    def _record(self, event: tuple, state: _State, bar, usable: list[ComfyClient]) -> None:
        kind, name = event[0], event[1]
        stats = self.stats.get(name)
        if kind == "done":
            stats.cells += 1
            stats.seconds.append(event[3])
        elif kind == "error":
            stats.failures += 1
        elif kind == "requeued":
            self.stats[name].requeued += 1
        elif kind == "lost":
            stats.status = f"lost after {stats.cells} cell{'s' if stats.cells != 1 else ''}: {brief(event[3])}"
            stats.failures += event[2] is not None
            self.log(f"compare: lost {stats.url} ({brief(event[3])})"
                     + ("; its unfinished cell goes to the other servers" if event[2] is not None else ""))
        elif kind == "failed":
            job = state.jobs[event[2]]
            self.log(f"compare: cell {job.label!r} failed on every server")
        if bar is not None and kind in ("done", "failed"):
            bar.update(1)
        if bar is not None:
            bar.set_postfix_str(" · ".join(f"{c.name} {self.stats[c.name].cells}"
                                           + (" lost" if self.stats[c.name].lost else "") for c in usable))

    def _cancel(self, state: _State, usable: list[ComfyClient], threads: list[threading.Thread]) -> None:
        state.stop.set()
        with state.cond:
            flights = [(c, state.in_flight.get(c.name)) for c in usable]
            state.cond.notify_all()
        for client, flight in flights:
            if flight and flight[1]:
                client.cancel(flight[1])
        for thread in threads:
            thread.join(timeout=2.0)
        while not state.events.empty():
            self._record(state.events.get(), state, None, usable)

    # --------------------------------------------------------------------------------------------
    # report
    # --------------------------------------------------------------------------------------------

    def report(self) -> str:
        """Each server's cells, mean seconds per cell, failed tries and status, one line per server."""
        lines = [["server", "cells", "s/cell", "failed", "status"]]
        for stats in self.stats.values():
            mean = f"{sum(stats.seconds) / len(stats.seconds):.2f}" if stats.seconds else "—"
            status = stats.status + (f" ({stats.requeued} of its cells re-queued)" if stats.requeued else "")
            if stats.note:
                status += f"; {stats.note} detected, not used"
            lines.append([stats.url, str(stats.cells), mean, str(stats.failures), status])
        lines.insert(1, ["-" * len(h) for h in lines[0]])
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        return "\n".join("  ".join([line[0].ljust(widths[0])] + [line[i].rjust(widths[i]) for i in (1, 2, 3)]
                                    + [line[4]]).rstrip() for line in lines)


def failure_text(label: str, errors: list[tuple[str, str]]) -> str:
    """A failed cell with every server's message."""
    lines = [f"cell {label!r} failed on every server that tried it:"]
    for server, message in errors:
        text = message.replace("\n", "\n      ")
        lines.append(f"  {server or 'compare'}: {text}")
    return "\n".join(lines)


def missing_cell(size: tuple[int, int], text: str) -> Cell:
    """A grey stand-in for a cell that failed or was not run (Ctrl-C), so the grid keeps its layout."""
    return Cell(Image.new("RGB", size, (228, 228, 228)), [text])
