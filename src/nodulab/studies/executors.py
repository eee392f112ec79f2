"""Executors of a study's runs, by name (``nodulab study --executor``): ``{name: fn(runs, batch, done)}``.

``local`` runs here (``--jobs 1``) or in spawned worker processes the driver owns (``Workers``);
``ray`` one Ray task per run (``ray_executor``). Only the driver's process writes the store: every
executor hands each finished run to ``done``.

Stopping (``--jobs N``): when the driver is interrupted (SIGINT, SIGTERM: any exception out of the
loop) queued runs are never started, results already sent are handed to ``done``, and each running
worker gets SIGTERM, which unwinds it (temporary folders removed, nothing recorded) and is followed
by SIGKILL after ``STOP_GRACE_S``. Workers ignore SIGINT (Ctrl-C reaches the whole process group;
the driver decides) and print no traceback; a worker whose driver died stops by itself within
``PARENT_POLL_S`` and writes nothing more.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from nodulab.studies.ray_executor import run_ray
from nodulab.studies.runner import Batch, Done, RunResult, RunSpec, execute

STOP_GRACE_S = 5.0
"""How long a stopped worker may take to unwind before it is killed."""
PARENT_POLL_S = 0.5
"""How often a worker checks that its driver is alive."""


class _Stop(BaseException):
    """Raised in a worker by SIGTERM: unwinds the run (``execute`` catches only ``Exception``)."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()


def _watch_parent(parent: int) -> None:
    """In a worker: once the driver is gone, stop this worker (SIGTERM to itself), then kill it."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    os._exit(1)


def _worker(conn: Connection, parent: int) -> None:
    """A worker's life: run each ``(spec, data_dirs, run_dir, device)`` received, send its result; stop
    at ``None``, at SIGTERM or when the driver is gone, quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stop)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        while (task := conn.recv()) is not None:
            spec, data_dirs, run_dir, device = task
            conn.send(execute(spec, {k: Path(v) for k, v in data_dirs.items()}, Path(run_dir), device))
    except (_Stop, EOFError, OSError):  # told to stop, or the driver's end of the pipe is gone
        pass


@dataclass
class _Slot:
    process: BaseProcess
    conn: Connection
    spec: RunSpec | None = None


class Workers:
    """``jobs`` spawned worker processes that run specs one at a time each, owned by the driver:
    ``run`` hands every result to ``done`` in the driver; on any exception (an interrupt included)
    the queue is dropped and every worker stopped before the exception goes on."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.paths = {k: str(v) for k, v in batch.data_dirs.items()}
        self.context = get_context("spawn")
        self.slots: list[_Slot] = []
        self.receiving: _Slot | None = None

    def _start(self) -> _Slot:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(theirs, os.getpid()), daemon=True)
        process.start()
        theirs.close()
        return _Slot(process, ours)

    def _give(self, slot: _Slot, queue: deque[RunSpec]) -> None:
        slot.spec = queue.popleft() if queue else None
        if slot.spec is not None:
            run_dir = str(self.batch.runs_dir / slot.spec.run_id)
            slot.conn.send((slot.spec, self.paths, run_dir, self.batch.device))

    def _receive(self, slot: _Slot) -> RunResult:
        """The result ``slot``'s worker sent, or a failed run if the worker died (it is replaced)."""
        assert slot.spec is not None
        try:
            self.receiving = slot  # an interrupt inside recv leaves this pipe mid-message
            result = slot.conn.recv()
            self.receiving = None
            return result
        except (EOFError, OSError):
            self.receiving = None
            slot.process.join(STOP_GRACE_S)
            code = slot.process.exitcode
            died = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            slot.conn.close()
            fresh = self._start()
            slot.process, slot.conn = fresh.process, fresh.conn
            return RunResult(slot.spec, "failed", f"worker process died ({died}; out of memory?)")

    def run(self, specs: list[RunSpec], done: Done) -> None:
        queue = deque(specs)
        try:
            for _ in range(min(self.batch.jobs, len(queue))):
                self.slots.append(self._start())
                self._give(self.slots[-1], queue)
            while busy := {s.conn: s for s in self.slots if s.spec is not None}:
                for conn in wait(list(busy), timeout=1.0):
                    slot = busy[conn]  # type: ignore[index]
                    done(self._receive(slot))
                    self._give(slot, queue)
        except BaseException:
            queue.clear()
            for slot in self.slots:  # results already sent are finished runs: record them
                if slot is self.receiving:  # interrupted mid-message: that run reruns on resume
                    continue
                if slot.spec is not None and slot.process.is_alive() and slot.conn.poll(0):
                    result, slot.spec = slot.conn.recv(), None
                    done(result)
            raise
        finally:
            self.stop()

    def stop(self) -> None:
        """End every worker: ``None`` to idle ones, SIGTERM to busy ones, SIGKILL after the grace."""
        for slot in self.slots:
            if not slot.process.is_alive():
                continue
            if slot.spec is None:
                try:
                    slot.conn.send(None)
                except OSError:
                    slot.process.terminate()
            else:
                slot.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for slot in self.slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
        self.slots.clear()


def run_local(specs: list[RunSpec], batch: Batch, done: Done) -> None:
    """Run ``specs`` here (``jobs`` 1) or in ``jobs`` spawned worker processes; ``done`` per result."""
    if batch.jobs == 1:
        for spec in specs:
            done(execute(spec, batch.data_dirs, batch.runs_dir / spec.run_id, batch.device, batch.progress))
        return
    Workers(batch).run(specs, done)


Executor = Callable[[list[RunSpec], Batch, Done], None]
EXECUTORS: dict[str, Executor] = {"local": run_local, "ray": run_ray}
"""Every executor by its ``--executor`` name (``common.choices.EXECUTORS`` lists the names for the CLI)."""
