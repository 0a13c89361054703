"""Whether an answer is mathematically equal to the reference: HF's math-verify (LaTeX -> sympy) run in a
worker process that is killed when one check outlives its timeout.

A process rather than math-verify's own `signal.alarm` timeout: that works only in the main thread and
cannot stop a computation stuck inside C code (a huge power, say), and scoring may run anywhere. The
worker is this module run as `python -m rlcore_tasks.equivalence`, speaking JSON lines on stdin/stdout;
it starts on the first check, again after a timeout, and exits when its stdin closes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 120.0
"""How long the worker may take to import math-verify and sympy (a few seconds on a busy machine)."""


class CheckTimeout(TimeoutError):
    """A check ran past its timeout; the worker was killed (the next check starts a new one)."""


def equivalent(gold: str, answer: str) -> bool:
    """math-verify's verdict on LaTeX / plain-text `answer` against `gold` (runs in the worker)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    target = parse(f"${answer}$", configs, parsing_timeout=None)  # type: ignore[arg-type]
    reference = parse(f"${gold}$", configs, parsing_timeout=None)  # type: ignore[arg-type]
    return bool(target and reference and verify(reference, target, timeout_seconds=None))


def serve() -> None:
    """The worker's loop: one JSON `[gold, answer]` per input line, one JSON verdict per output line."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own timeouts are off
    import math_verify  # noqa: F401 - imported before announcing readiness, so checks are timed alone

    print('"ready"', flush=True)
    for line in sys.stdin:
        gold, answer = json.loads(line)
        try:
            verdict: Any = equivalent(gold, answer)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it there
            verdict = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(verdict), flush=True)


class Checker:
    """Checks answers in a worker process, each within `timeout_s` seconds (thread-safe)."""

    def __init__(self, timeout_s: float) -> None:
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("the math task checks answers with math-verify: pip install math-verify")
        self.timeout_s = timeout_s
        self._worker: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def __call__(self, gold: str, answer: str) -> bool:
        """Whether `answer` equals `gold`; CheckTimeout when math-verify takes longer than the timeout."""
        with self._lock:
            worker = self._start()
            assert worker.stdin is not None
            worker.stdin.write(json.dumps([gold, answer]) + "\n")
            worker.stdin.flush()
            verdict = self._read(worker, self.timeout_s)
            if verdict is None:
                died = worker.poll()
                self._stop()
                if died is not None:
                    raise RuntimeError(f"the math-verify worker died (exit status {died})")
                raise CheckTimeout(f"math-verify took longer than {self.timeout_s:g} s")
        if isinstance(verdict, dict):
            raise RuntimeError(f"math-verify failed: {verdict['error']}")
        return bool(verdict)

    def close(self) -> None:
        """Stop the worker (a later check starts a new one)."""
        with self._lock:
            self._stop()

    def _start(self) -> subprocess.Popen[str]:
        if self._worker is not None and self._worker.poll() is None:
            return self._worker
        paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}  # rlcore_tasks importable
        self._worker = subprocess.Popen([sys.executable, "-m", "rlcore_tasks.equivalence"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        if self._read(self._worker, STARTUP_TIMEOUT_S) != "ready":
            self._stop()
            raise RuntimeError("the math-verify worker did not start (see its error output above)")
        return self._worker

    def _stop(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            for stream in (self._worker.stdin, self._worker.stdout):
                if stream is not None:
                    stream.close()
            self._worker = None

    @staticmethod
    def _read(worker: subprocess.Popen[str], timeout_s: float) -> Any:
        """The worker's next JSON line, or None when none comes within `timeout_s` (or it died)."""
        assert worker.stdout is not None
        ready, _, _ = select.select([worker.stdout], [], [], timeout_s)
        line = worker.stdout.readline() if ready else ""
        return json.loads(line) if line else None


if __name__ == "__main__":
    serve()
