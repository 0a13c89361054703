"""Talking to an SGLang HTTP server, and launching one on 127.0.0.1 that rlcore owns and stops.

The client uses only the standard library (urllib), so `--rollout sglang` against a remote server needs
no extra HTTP package. Every failure (refused connection, timeout, HTTP 4xx/5xx, invalid JSON) becomes an
`SGLangError` naming the endpoint, what SGLang said and what to do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rlcore_backends.rollout.sglang.api import SGLangError, error_message

ORIGINAL_LOGPROB_ENV = ("SGLANG_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB")
"""Variables that make SGLang report logprobs before temperature scaling (its names across versions)."""


class HTTPClient:
    """JSON requests to one SGLang server (`url` like http://127.0.0.1:30000)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def post(self, endpoint: str, payload: dict[str, Any] | None = None, as_json: bool = True) -> Any:
        """POST `payload` as JSON; returns the decoded JSON answer (or the text when not `as_json`)."""
        data = json.dumps(payload or {}).encode()
        request = urllib.request.Request(self.url + endpoint, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        return self._send(endpoint, request, as_json)

    def get(self, endpoint: str, timeout: float | None = None) -> int:
        """GET `endpoint`; returns the HTTP status (raises only when the server cannot be reached)."""
        request = urllib.request.Request(self.url + endpoint, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError as e:  # URLError (refused, unknown host), timeouts, dropped connections
            raise self._unreachable(getattr(e, "reason", e)) from None

    def _send(self, endpoint: str, request: urllib.request.Request, as_json: bool) -> Any:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                detail = error_message(json.loads(text))
            except json.JSONDecodeError:
                detail = text.strip()[:500]
            raise SGLangError(f"SGLang {endpoint} answered HTTP {e.code}: {detail}") from None
        except OSError as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise SGLangError(f"SGLang {endpoint} did not answer within {self.timeout:g} s at {self.url}: the "
                                  "server is overloaded or stuck; raise rollout.timeout or check its log") from None
            raise self._unreachable(reason) from None
        if not as_json:
            return body
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise SGLangError(f"SGLang {endpoint} returned invalid JSON ({e.msg}): {body[:200]!r}; is {self.url} "
                              "an SGLang server?") from None

    def _unreachable(self, reason: object) -> SGLangError:
        return SGLangError(f"cannot reach the SGLang server at {self.url} ({reason}): start it with `python -m "
                           "sglang.launch_server --model-path ... --port ...`, fix rollout.url, or leave rollout.url "
                           "empty to let rlcore launch one")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(server_args: dict[str, Any], host: str, port: int) -> list[str]:
    """`python -m sglang.launch_server` with `server_args` (ServerArgs field names) as its flags."""
    command = [sys.executable, "-m", "sglang.launch_server", "--host", host, "--port", str(port)]
    for name, value in server_args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False and value is not None:
            command += [flag, str(value)]
    return command


class ServerProcess:
    """An SGLang server rlcore started in its own process group; `stop` ends the whole group."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ORIGINAL_LOGPROB_ENV}
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def wait_ready(self, client: HTTPClient, timeout: float) -> None:
        """Poll `GET /health` until it answers 200; raise (and stop the server) if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SGLangError(f"the SGLang server exited with code {self.process.returncode} while starting; "
                                  f"its log ({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if client.get("/health", timeout=5) == 200:
                    return
            except SGLangError:
                pass  # not listening yet
            time.sleep(0.5)
        self.stop()
        raise SGLangError(f"the SGLang server did not become healthy within {timeout:g} s (raise rollout.timeout "
                          f"for big models); its log ({self.log_path}) ends with:\n{self.log_tail()}")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds; returns once no
        process of the group runs (so its GPU memory is free)."""
        self._signal(signal.SIGTERM)
        if not self._wait_group(grace):
            self._signal(signal.SIGKILL)
            self._wait_group(10.0)
        if self.process.poll() is None:
            self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_group(self, timeout: float) -> bool:
        """Wait until the group has no running process (children such as SGLang's scheduler included)."""
        deadline = time.monotonic() + timeout
        while True:
            self.process.poll()  # reap the launcher
            if not self._members():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _members(self) -> list[int]:
        """Pids of the live (not zombie) processes in the server's process group, from /proc."""
        members = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == self.process.pid:
                members.append(int(entry.name))
        return members
