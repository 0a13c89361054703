"""The driver's handle on the Megatron worker processes: start them, send a command to all, collect answers.

Workers are spawned with torch.multiprocessing; each builds its worker object (`make_worker(rank)`, a
`megatron_worker.Worker`), serves commands from its own queue and answers on a shared one, and stops by itself
if the driver dies. A command is a
picklable callable `fn(worker, *args)` (usually a `Worker` method). Every wait
has a deadline and watches the processes, so a dead or stuck rank becomes a `TrainingError` naming it,
and any failure stops every worker (the others would wait forever in a collective).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from rlcore.errors import RLCoreError, TrainingError

POLL_SECONDS = 1.0


def free_address() -> str:
    """A `tcp://127.0.0.1:PORT` rendezvous address on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def serve(rank: int, make_worker: Callable[[int], Any], commands: Any, answers: Any,
          init: Callable[[], None] | None) -> None:
    """A worker process: build the rank's worker, run commands until told to stop (None), then `close` it.
    Ctrl-C is left to the driver, which finishes its step and checkpoints before closing the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.setpgrp()  # its own process group, so `WorkerPool` can end it with every process it started
    try:
        if init is not None:
            init()
        worker = make_worker(rank)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises
        answers.put((rank, "error", _describe(e)))
        return
    answers.put((rank, "ok", None))
    parent = os.getppid()
    while True:
        try:
            command = commands.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:  # the driver died: nobody will send `None`
                return
            continue
        if command is None:
            break
        fn, args = command
        try:
            answers.put((rank, "ok", fn(worker, *args)))
        except BaseException as e:  # noqa: BLE001
            answers.put((rank, "error", _describe(e)))
    worker.close()


def _describe(e: BaseException) -> Any:
    """What the driver re-raises: an rlcore error as is (its message is for the user), else the traceback."""
    return e if isinstance(e, RLCoreError) else "".join(traceback.format_exception(e))


class WorkerPool:
    """`size` worker processes, one per global rank; `run` sends a command to all and returns their answers.
    `init`, if given, runs first in each process."""

    def __init__(self, make_worker: Callable[[int], Any], size: int, timeout: float,
                 init: Callable[[], None] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.timeout, self.size = timeout, size
        self.answers = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(size)]
        self.processes = [ctx.Process(target=serve, args=(rank, make_worker, self.commands[rank], self.answers, init),
                                      name=f"megatron-rank-{rank}") for rank in range(self.size)]
        """Not daemons: megatron-core's checkpoint writer starts processes of its own; a worker whose driver
        died stops by itself (`serve`)."""
        self.broken: str | None = None
        for p in self.processes:
            p.start()
        self._collect("start-up")

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Call `fn(worker, *args)` on every rank; their return values in rank order."""
        if self.broken:
            raise TrainingError(f"the Megatron workers were stopped after an earlier failure ({self.broken})")
        for q in self.commands:
            q.put((fn, args))
        return self._collect(getattr(fn, "__name__", str(fn)))

    def close(self) -> None:
        """Ask every worker to stop, then end those that do not within a few seconds."""
        for q, p in zip(self.commands, self.processes, strict=True):
            if p.is_alive():
                q.put(None)
        for p in self.processes:
            p.join(timeout=10)
        self._kill()

    def _kill(self) -> None:
        """End every worker and whatever it started (megatron-core's checkpoint writer starts processes)."""
        for p in self.processes:
            if p.pid is None:
                continue
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.join(timeout=10)

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        self.broken = message.splitlines()[0]
        self._kill()
        if cause is not None:
            raise cause
        raise TrainingError(message)

    def _collect(self, what: str) -> list[Any]:
        """Every rank's answer to the command in flight, watching for errors, deaths and the deadline."""
        results: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout
        while len(results) < self.size:
            try:
                rank, status, value = self.answers.get(timeout=POLL_SECONDS)
            except queue.Empty:
                for rank, p in enumerate(self.processes):
                    if rank not in results and not p.is_alive():
                        self._fail(f"Megatron worker rank {rank} died (exit code {p.exitcode}) during {what}")
                if time.monotonic() > deadline:
                    waiting = sorted(set(range(self.size)) - set(results))
                    self._fail(f"Megatron worker ranks {waiting} did not answer {what} within {self.timeout:g} s "
                               "(backend.worker_timeout)")
                continue
            if status == "error":
                if isinstance(value, RLCoreError):
                    self._fail(str(value), value)
                self._fail(f"Megatron worker rank {rank} failed during {what}:\n{value}")
            results[rank] = value
        return [results[rank] for rank in range(self.size)]
