"""Judge processes, the trainer's side: where a problem's tests run and its verdicts are decided, in a
process of its own that the solution never reaches (see `judge_runner`). The solution's sandbox gets
only the operations to replay (calls with their arguments, as plain data); the judge gets only the
results (plain data, decoded strictly). Expected values, test source and verdicts never enter a sandbox.

A judge is a plain `python -I -S` process (it runs the dataset's trusted tests on plain data), kept
alive between problems, one per scoring thread; its address space is capped, each request has a CPU
budget, and a judge that does not answer in time is killed (and replaced on the next request).
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from rlcore_tasks.plaindata import DecodeError, decode, encode

HERE = Path(__file__).parent
JUDGE = "".join((HERE / name).read_text() for name in ("plaindata.py", "sandbox_runner.py", "judge_runner.py"))
JUDGE += "\njudge_main()\n"
PASSED, FAILED, WAITING = 1, 0, -1
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
MAX_REPLY = 64 << 20
"""Largest answer read from a judge (its operations carry the tests' arguments)."""

Problem = tuple[str, str, str, tuple[str, ...], tuple[str, ...]]
"""(prompt code, entry point, setup code, tests, builtin names the solution defines), as
`judge_runner.judge` takes it."""


class JudgeError(Exception):
    """The judge ended or did not answer in time: the tests it had not decided do not pass."""


class BadProblem(Exception):
    """The judge cannot run a problem's tests (they do not compile): a malformed row, not a wrong answer."""


class Judge:
    """One judge process."""

    def __init__(self, python: str, memory_bytes: int, cpu_s: int) -> None:
        in_r, self.to_judge = os.pipe()
        self.from_judge, out_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-S", "-c", JUDGE, str(in_r), str(out_w), str(memory_bytes), str(cpu_s)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(in_r, out_w), env=ENV, cwd="/", start_new_session=True)
        finally:
            os.close(in_r)
            os.close(out_w)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, problem: Problem, ops: Sequence[bytes], results: Sequence[bytes | None],
            timeout_s: float) -> tuple[list[int], list[bytes]]:
        """One pass over `problem`'s tests given the last operations and their results: (PASSED / FAILED /
        WAITING per test, the operations of this pass). JudgeError when the judge fails to answer."""
        request = encode((problem, list(ops), list(results)))
        deadline = time.monotonic() + timeout_s
        try:
            _write_all(self.to_judge, b"%d:" % len(request) + request)
            reply = decode(self._read(deadline))
        except (OSError, DecodeError, JudgeError) as e:
            self.close()
            raise JudgeError(f"the judge failed: {e}") from None
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "error":
            raise BadProblem(f"the problem's tests cannot run: {reply[1]}")
        outcomes, new_ops = reply
        if not (all(type(o) is int for o in outcomes) and all(type(op) is bytes for op in new_ops)):
            raise JudgeError(f"a malformed answer: {reply!r:.200}")
        return list(outcomes), list(new_ops)

    def _read(self, deadline: float) -> bytes:
        head = self._read_exactly(1, deadline)
        while not head.endswith(b":"):
            if len(head) > 12:
                raise JudgeError("a malformed answer")
            head += self._read_exactly(1, deadline)
        size = int(head[:-1])
        if size > MAX_REPLY:
            raise JudgeError(f"an answer of {size} bytes")
        return self._read_exactly(size, deadline)

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        data = b""
        poller = select.poll()
        poller.register(self.from_judge, select.POLLIN)
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise JudgeError("no answer in time")
            chunk = os.read(self.from_judge, size - len(data))
            if not chunk:
                raise JudgeError(f"the judge ended (exit {self.proc.poll()})")
            data += chunk
        return data

    def close(self) -> None:
        """Kill the judge and close its pipes (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.to_judge, self.from_judge):
            if fd >= 0:
                os.close(fd)
        self.to_judge = self.from_judge = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Judges:
    """A judge per thread, started on first use and replaced when it dies."""

    def __init__(self, python: str, memory_bytes: int, cpu_s: int) -> None:
        self.args = (python, memory_bytes, cpu_s)
        self.local = threading.local()
        self.all: list[Judge] = []
        self.lock = threading.Lock()

    def get(self) -> Judge:
        """This thread's judge, alive."""
        judge = getattr(self.local, "judge", None)
        if judge is None or not judge.alive:
            if judge is not None:
                judge.close()
            judge = self.local.judge = Judge(*self.args)
            with self.lock:
                self.all = [j for j in self.all if j.alive] + [judge]
        return judge

    def close(self) -> None:
        """Stop every judge."""
        with self.lock:
            judges, self.all = self.all, []
        for judge in judges:
            judge.close()
