"""A client for a SandboxFusion-compatible code execution service (`POST /run_code`), the remote
alternative to the local bubblewrap sandbox, with the same `run(program, stdin)` and `call(solution,
imports, ops)` interface: a call's results come back as lines of the program's output, which the
program could forge, but then only with values of its choosing: the tests are judged here.

Request: `{"code", "language": "python", "stdin", "run_timeout", "compile_timeout", "memory_limit_MB",
"files": {}, "fetch_files": []}`. Response: `{"status": "Success" | "Failed" | "SandboxError", "message",
"run_result": {"status": "Finished" | "TimeLimitExceeded" | "Error", "return_code", "stdout", "stderr",
"execution_time"}, ...}`. "Failed" only means a non-zero exit or a timeout: the tests decide the reward.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import attrs

from rlcore_tasks.sandbox import RUNNER_CODE, Limits, RunResult, SandboxError

RESULT = re.compile(r"^@@rlcore-result ([0-9a-f]*)$", re.M)
"""A result line of `sandbox_runner.serve_lines`."""
RETRIES = 3
RETRY_STATUS = (429, 500, 502, 503, 504)
REQUEST_SLACK_S = 30.0
"""Seconds the HTTP request may take beyond the run's own timeout (queueing, start-up)."""


def endpoint(url: str) -> str:
    """The `/run_code` URL of a service given by its base URL or by the endpoint itself."""
    url = url.rstrip("/")
    return url if url.endswith("/run_code") else f"{url}/run_code"


class SandboxFusion:
    """Runs programs on a SandboxFusion service; `run` is safe to call from many threads."""

    def __init__(self, url: str, limits: Limits) -> None:
        self.url = endpoint(url)
        self.limits = limits

    def check(self) -> None:
        """Run a trivial program; SandboxError naming the URL when the service does not answer right."""
        result = self.run("print('ok')")
        if result.exit_code != 0 or result.stdout.strip() != "ok":
            raise SandboxError(f"the sandbox service at {self.url} did not run a trivial program: "
                               f"exit {result.exit_code}, stderr {result.stderr[-500:]!r}")

    def run(self, program: str, stdin: str = "") -> RunResult:
        """Run `program` with `stdin` on the service; SandboxError when it fails or says SandboxError."""
        payload = {"code": program, "language": "python", "stdin": stdin, "run_timeout": self.limits.timeout_s,
                   "compile_timeout": self.limits.timeout_s, "memory_limit_MB": self.limits.memory_mb,
                   "files": {}, "fetch_files": []}
        start = time.perf_counter()
        body = self._post(payload)
        if body.get("status") == "SandboxError":
            raise SandboxError(f"{self.url} answered SandboxError: {str(body.get('message'))[:500]}")
        run = body.get("run_result") or {}
        kept = self.limits.output_kb << 10
        code = run.get("return_code")
        exit_code = None if run.get("status") == "TimeLimitExceeded" else int(code) if code is not None else -1
        return RunResult(exit_code=exit_code, stdout=(run.get("stdout") or "")[:kept],
                         stderr=(run.get("stderr") or "")[:kept], seconds=time.perf_counter() - start)

    def call(self, solution: str, imports: str, ops: Sequence[bytes]) -> RunResult:
        """Run `solution` as a module, then each encoded operation of `ops` (`sandbox_runner.serve`), on the
        service; the result lines of its output come back as length-prefixed frames in `results`."""
        program = (f"{RUNNER_CODE}\nserve_lines({solution!r}, {imports!r}, {list(ops)!r}, "
                   f"{self.limits.output_kb << 10})\n")
        result = self.run(program)
        results = b"".join(b"%d:" % (len(f) // 2) + bytes.fromhex(f) for f in RESULT.findall(result.stdout)
                           if len(f) % 2 == 0)
        return attrs.evolve(result, results=results)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST `payload` as JSON; retried on connection errors and 429/5xx, then SandboxError."""
        data = json.dumps(payload).encode()
        error = ""
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, method="POST", headers={
                "Content-Type": "application/json", "Accept": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.limits.timeout_s + REQUEST_SLACK_S) as response:
                    body = json.loads(response.read())
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code} {e.reason}"
                if e.code in RETRY_STATUS:
                    continue
                break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            except json.JSONDecodeError as e:
                error = f"the answer is not JSON ({e})"
                break
            if not isinstance(body, dict):
                error = f"the answer is not a JSON object: {str(body)[:200]}"
                break
            return body
        raise SandboxError(f"sandbox service {self.url} failed: {error}")
