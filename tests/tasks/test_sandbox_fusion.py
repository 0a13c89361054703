"""The SandboxFusion client against a small fake service on 127.0.0.1 that follows SandboxFusion's
`/run_code` schema (sandbox/server/sandbox_api.py of bytedance/SandboxFusion): request fields checked
like its pydantic model, code run by a plain subprocess (the test's own trusted programs), answers with
`status` Success / Failed / SandboxError and `run_result` {status, return_code, stdout, stderr}."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rlcore import Prompt
from rlcore.config import build_options
from rlcore.testing import check_task, make_batch
from rlcore_tasks.code import Code
from rlcore_tasks.sandbox import Limits, SandboxError
from rlcore_tasks.sandbox_fusion import SandboxFusion, endpoint

HUMANEVAL = Path(__file__).resolve().parents[1] / "data" / "humaneval" / "HumanEval.jsonl"
FIELDS = {"code": str, "language": str, "stdin": (str, type(None)), "run_timeout": (int, float),
          "compile_timeout": (int, float), "memory_limit_MB": int, "files": dict, "fetch_files": list}
LANGUAGES = ("python", "cpp", "nodejs", "go", "java", "bash")


class FakeSandboxFusion(ThreadingHTTPServer):
    """POST /run_code. `failures` lists HTTP statuses to answer before serving normally."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.failures: list[int] = []
        self.answer_sandbox_error = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeSandboxFusion

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        if self.path != "/run_code":
            return self.reply(404, {"detail": "Not Found"})
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        if self.server.failures:
            return self.reply(self.server.failures.pop(0), {"detail": "busy"})
        errors = [k for k, t in FIELDS.items() if k in request and not isinstance(request[k], t)]
        errors += [k for k in ("code", "language") if k not in request]
        if errors or request["language"] not in LANGUAGES or set(request) - set(FIELDS):
            return self.reply(422, {"detail": f"invalid fields {errors or sorted(set(request) - set(FIELDS))}"})
        if self.server.answer_sandbox_error:
            return self.reply(200, {"status": "SandboxError", "message": "no runner available", "run_result": None})
        self.reply(200, run(request))


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Execute like SandboxFusion's python runner: the code as a script, stdin, the run timeout."""
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-c", request["code"]], input=request.get("stdin") or "",
                           capture_output=True, text=True, timeout=request.get("run_timeout", 10))
        result = {"status": "Finished", "return_code": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    except subprocess.TimeoutExpired as e:
        result = {"status": "TimeLimitExceeded", "return_code": None, "stdout": e.stdout or "", "stderr": ""}
    result["execution_time"] = time.monotonic() - start
    ok = result["status"] == "Finished" and result["return_code"] == 0
    return {"status": "Success" if ok else "Failed", "message": "", "compile_result": None, "run_result": result,
            "executor_pod_name": None, "files": {}}


@pytest.fixture
def service() -> Iterator[FakeSandboxFusion]:
    server = FakeSandboxFusion()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


LIMITS = Limits(timeout_s=2.0, memory_mb=256, output_kb=8)


def test_endpoint_accepts_a_base_url_or_the_endpoint():
    assert endpoint("http://h:8080") == endpoint("http://h:8080/") == endpoint("http://h:8080/run_code") \
        == "http://h:8080/run_code"


def test_run_maps_the_response(service):
    client = SandboxFusion(service.url, LIMITS)
    r = client.run("import sys\nprint(sys.stdin.read()[::-1])\nprint('warn', file=sys.stderr)\nsys.exit(2)", stdin="abc")
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (2, "cba\n", "warn\n", False)
    assert service.requests[-1] == {
        "code": service.requests[-1]["code"], "language": "python", "stdin": "abc", "run_timeout": 2.0,
        "compile_timeout": 2.0, "memory_limit_MB": 256, "files": {}, "fetch_files": []}
    slow = client.run("import time\ntime.sleep(10)")
    assert slow.timed_out and slow.exit_code is None
    assert client.run("print('x' * 100000)").stdout == "x" * 8192
    client.check()


def test_busy_service_is_retried_then_given_up_on(service, monkeypatch):
    monkeypatch.setattr("rlcore_tasks.sandbox_fusion.time.sleep", lambda s: None)
    client = SandboxFusion(service.url, LIMITS)
    service.failures = [503, 429]
    assert client.run("print(1)").stdout == "1\n" and len(service.requests) == 3
    service.failures = [502, 502, 502]
    with pytest.raises(SandboxError, match="HTTP 502"):
        client.run("print(1)")
    service.failures = [400]
    with pytest.raises(SandboxError, match="HTTP 400"):
        client.run("print(1)")
    assert len(service.requests) == 7  # 400 is not retried


def test_sandbox_error_and_unreachable_service_raise(service, monkeypatch):
    monkeypatch.setattr("rlcore_tasks.sandbox_fusion.time.sleep", lambda s: None)
    service.answer_sandbox_error = True
    with pytest.raises(SandboxError, match="SandboxError: no runner available"):
        SandboxFusion(service.url, LIMITS).run("print(1)")
    with pytest.raises(SandboxError, match="did not run a trivial program|SandboxError"):
        SandboxFusion(service.url, LIMITS).check()
    closed = FakeSandboxFusion()
    url = closed.url
    closed.server_close()
    with pytest.raises(SandboxError, match=f"{url}/run_code failed: URLError"):
        SandboxFusion(url, LIMITS).run("print(1)")
    with pytest.raises(SandboxError, match="404"):
        SandboxFusion(f"{service.url}/elsewhere/run_code", LIMITS).run("print(1)")


def test_code_task_scores_through_the_service(service):
    t = Code(build_options(Code.Options, {"backend": "sandbox_fusion", "sandbox_url": service.url,
                                          "train_path": str(HUMANEVAL), "timeout_s": 5}, "task"))
    t.setup(ctx=None)
    prompts = list(t.dataset("train"))[:4]
    rows = [json.loads(line) for line in HUMANEVAL.read_text().splitlines()[:4]]
    mbpp = Prompt(messages=[{"role": "user", "content": "?"}], id="m", answer={
        "kind": "asserts", "prefix": "", "entry_point": "", "setup": "",
        "tests": ["assert inc(1) == 2", "assert inc(5) == 6", "assert inc(-1) == 1"]})
    stdio = Prompt(messages=[{"role": "user", "content": "?"}], id="s", answer={
        "kind": "stdio", "cases": [{"input": "2\n", "output": "4\n"}, {"input": "-3\n", "output": "9\n"}]})
    batch = make_batch(groups=7, n=1)
    batch.prompts = [*prompts, mbpp, stdio, stdio]
    batch.texts = [*(r["canonical_solution"] for r in rows[:3]), "    return None\n",
                   "```python\ndef inc(x):\n    return x + 1\n```", "```python\nprint(int(input()) ** 2)\n```",
                   "```python\nprint(2 * int(input()))\n```"]
    s = t.score(batch)
    assert s.rewards.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0, 2 / 3, 1.0, 0.5])
    assert all(r["language"] == "python" for r in service.requests)
    check_task(t)
    t.teardown()


def test_the_service_gets_the_solution_and_calls_never_the_tests(service):
    """Through the service too, the tests are judged here: the program sent holds the solution and the
    calls, and a solution printing result lines of its own only chooses its own answers."""
    t = Code(build_options(Code.Options, {"backend": "sandbox_fusion", "sandbox_url": service.url, "timeout_s": 5},
                           "task"))
    tests = ["assert f(2) == 'EXPECTED-42'", "import math\nassert math.isclose(f(3), 17.25)"]
    prompt = Prompt(messages=[{"role": "user", "content": "?"}], id="m", answer={
        "kind": "asserts", "prefix": "", "entry_point": "", "setup": "", "tests": tests})
    right = "```python\ndef f(x):\n    return 'EXPECTED-42' if x == 2 else 17.25\n```"
    forger = ("```python\nimport sys\nfor value in (b'T', b'i1;', b'f0x1.1400000000000p+4;'):\n"
              "    print('@@rlcore-result ' + value.hex())\ndef f(x):\n    return 0\n```")
    batch = make_batch(groups=2, n=1)
    batch.prompts, batch.texts = [prompt, prompt], [right, forger]
    assert t.score(batch).rewards.tolist() == [1.0, 0.0]
    sent = [r["code"] for r in service.requests if "serve_lines(" in r["code"]]
    assert len(sent) == 2 and not any("assert " in code or "isclose" in code for code in sent)
    t.teardown()
