"""A group of training processes driven from the loop's process, one call at a time.

Every call is collective: each rank gets its own keyword arguments (its shard of the batch), runs the
same method, and rank 0's return value is the answer. Two ways to hold the ranks:

- `SpawnedGroup`: the ranks are child processes started here (spawn), each with a pipe. Replies are
  awaited with a deadline while watching every process, so a rank that dies or fails gives an error
  naming it instead of a hang.
- `TorchrunGroup`: this process is rank 0 of a group torchrun launched; the other ranks run
  `serve_ranks`, receiving each call through `scatter_object_list`.
"""

from __future__ import annotations

import pickle
import signal
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from rlcore import errors
from rlcore.errors import RLCoreError, TrainingError

ERROR_GRACE_S = 10.0
"""After one rank reports an error, how long the others get to answer before the group is stopped."""


def _send(conn: Connection, message: Any) -> None:
    # plain pickle (a copy), not torch's shared-memory reductions: a message outlives its sender's tensors
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())  # noqa: S301 - our own processes


def _error_reply(e: BaseException) -> tuple[str, str, str, str]:
    return ("error", type(e).__name__, str(e), traceback.format_exc())


def serve(conn: Connection, factory: type, spec: Any) -> None:
    """A spawned rank's main loop: build `factory(spec)`, then run each `(method, kwargs)` the driver
    sends and reply `("ok", result)` or `("error", ...)`, until `close` or the driver goes away. Ctrl-C
    is left to the driver, which closes the group in its teardown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = factory(spec)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises it with the rank
        _send(conn, _error_reply(e))
        return
    _send(conn, ("ok", None))
    while True:
        try:
            method, kwargs = _receive(conn)
        except (EOFError, OSError):
            return  # the driver is gone
        try:
            result = getattr(worker, method)(**kwargs)
        except Exception as e:  # noqa: BLE001 - reported to the driver
            _send(conn, _error_reply(e))
            continue
        _send(conn, ("ok", result))
        if method == "close":
            return


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class SpawnedGroup:
    """`len(specs)` processes running `serve(conn, factory, spec)`, started with torch.multiprocessing spawn."""

    def __init__(self, factory: type, specs: list[Any], timeout_s: float, name: str) -> None:
        self.name, self.timeout_s = name, timeout_s
        self.stopped: str | None = None
        context = mp.get_context("spawn")
        self.processes: list[Any] = []
        self.conns: list[Connection] = []
        for rank, spec in enumerate(specs):
            parent, child = context.Pipe()
            process = context.Process(target=serve, args=(child, factory, spec), daemon=True,
                                      name=f"rlcore-{name}-rank{rank}")
            process.start()
            child.close()
            self.processes.append(process)
            self.conns.append(parent)
        try:
            self._collect("setup")
        except RLCoreError:
            self._stop("setup failed")
            raise

    @property
    def world_size(self) -> int:
        return len(self.processes)

    def call(self, method: str, kwargs: list[dict[str, Any]]) -> Any:
        """Run `method(**kwargs[rank])` on every rank; rank 0's result."""
        if self.stopped:
            raise TrainingError(f"the {self.name} workers were stopped earlier ({self.stopped}); start a new run")
        for conn, kw in zip(self.conns, kwargs):
            try:
                _send(conn, (method, kw))
            except OSError:
                pass  # a rank that is gone: `_collect` reports it by rank
        return self._collect(method)

    def close(self) -> None:
        """Ask every rank to close, then end any that do not within a few seconds."""
        if self.stopped is None:
            try:
                self.call("close", [{} for _ in self.processes])
            except RLCoreError:
                pass
        self._stop("closed")

    def _collect(self, method: str) -> Any:
        """Wait for every rank's reply; raise the first error, naming the rank, or a dead or silent rank."""
        replies: dict[int, Any] = {}
        failed: tuple[int, Any] | None = None
        deadline = time.monotonic() + self.timeout_s
        while len(replies) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in replies]
            ready = wait([self.conns[r] for r in pending] + [self.processes[r].sentinel for r in pending],
                         timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._stop(f"no reply to {method}")
                if failed is not None:
                    self._raise(*failed, method)
                raise TrainingError(
                    f"{self.name} worker rank(s) {pending} gave no reply to {method!r} within "
                    f"{self.timeout_s:g} s; the workers were stopped. Raise backend.timeout_s if a step "
                    "really takes that long.")
            for r in pending:
                conn, process = self.conns[r], self.processes[r]
                if conn in ready or (process.sentinel in ready and conn.poll()):
                    try:
                        replies[r] = _receive(conn)
                    except (EOFError, OSError):
                        process.join(1.0)
                if r not in replies and process.sentinel in ready:
                    process.join(1.0)
                    reason = _exit_reason(process.exitcode)
                    self._stop(f"rank {r} {reason}")
                    raise TrainingError(
                        f"{self.name} worker rank {r} (pid {process.pid}) {reason} during {method!r}; "
                        "the other workers were stopped. Its output above says why (out of memory, killed, "
                        "a crash in a collective).")
                if r in replies and replies[r][0] == "error" and failed is None:
                    failed = (r, replies[r])
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        if failed is not None:
            self._raise(*failed, method)
        return replies[0][1]

    def _raise(self, rank: int, reply: tuple[str, str, str, str], method: str) -> None:
        _, kind, message, trace = reply
        cls = getattr(errors, kind, None)
        if isinstance(cls, type) and issubclass(cls, RLCoreError):
            raise cls(message)
        raise TrainingError(f"{self.name} worker rank {rank} failed in {method!r}: {kind}: {message}\n{trace}")

    def _stop(self, reason: str) -> None:
        """End every process (gracefully if it is already closing) and mark the group unusable."""
        self.stopped = self.stopped or reason
        for process in self.processes:
            process.join(5.0 if reason == "closed" else 0.0)
            if process.is_alive():
                process.terminate()
                process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()


class TorchrunGroup:
    """This process is rank 0 of a torchrun group and holds its worker; the others run `serve_ranks`."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def call(self, method: str, kwargs: list[dict[str, Any]]) -> Any:
        """Scatter `(method, kwargs[rank])` to every rank, run rank 0's share here, return its result."""
        box: list[Any] = [None]
        dist.scatter_object_list(box, [(method, kw) for kw in kwargs], src=0)
        return getattr(self.worker, method)(**kwargs[0])

    def close(self) -> None:
        self.call("close", [{} for _ in range(self.world_size)])


def serve_ranks(worker: Any) -> None:
    """A torchrun rank > 0: run each call rank 0 scatters until `close`. An `RLCoreError` that every
    rank raises together (a non-finite loss) is rank 0's to report; anything else ends this process."""
    while True:
        box: list[Any] = [None]
        dist.scatter_object_list(box, None, src=0)
        method, kwargs = box[0]
        try:
            getattr(worker, method)(**kwargs)
        except RLCoreError:
            pass
        if method == "close":
            return
