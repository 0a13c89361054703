"""The SGLang HTTP client and server launcher against a real `http.server` speaking SGLang's documented API
(`sglang_fake.FakeServer`): every endpoint's payload, error answers, and the launched server's shutdown."""

from __future__ import annotations

import base64
import os
import pickle
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sglang_fake import TESTS_DIR, FakeServer, alive, fake_sglang_package, pickle_serializer

from rlcore import SamplingParams
from rlcore_backends.rollout.sglang.api import SGLangError
from rlcore_backends.rollout.sglang.engines import SGLangServer
from rlcore_backends.rollout.sglang.server import HTTPClient, ServerProcess, free_port, server_command

@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server
    assert server.violations == [], "every request must match SGLang's documented schema"


def connect(fake: FakeServer, tp_size: int = 1, timeout: float = 5.0) -> SGLangServer:
    return SGLangServer(HTTPClient(fake.url, timeout), tp_size, serialize=pickle_serializer)


def test_generate_over_http(fake: FakeServer) -> None:
    server = connect(fake)
    done = server.generate([[3, 4, 5], [6]], SamplingParams(temperature=0.5, max_new_tokens=4, stop=["\n"]))
    [body] = fake.bodies("/generate")
    assert body["input_ids"] == [[3, 4, 5], [6]] and body["return_logprob"] is True
    assert body["sampling_params"]["stop"] == ["\n"] and body["sampling_params"]["max_new_tokens"] == 4
    assert [len(c.token_ids) for c in done] == [4, 4] and all(c.finish_reason == "length" for c in done)
    assert done[0].logprobs == [-0.25, -0.5, -0.75, -1.0]


def test_finish_reasons_over_http(fake: FakeServer) -> None:
    fake.outputs = [
        {"text": "ab", "meta_info": {"finish_reason": {"type": "stop", "matched": 1}, "completion_tokens": 2,
                                     "output_token_logprobs": [[-0.1, 7, None], [-0.2, 1, None]]}},
        {"text": "a\n", "meta_info": {"finish_reason": {"type": "stop", "matched": "\n"}, "completion_tokens": 2,
                                      "output_token_logprobs": [[-0.3, 7, None], [-0.4, 9, None]]}},
        {"text": "aaa", "meta_info": {"finish_reason": {"type": "length", "length": 3}, "completion_tokens": 3,
                                      "output_token_logprobs": [[-0.5, 7, None]] * 3}},
    ]
    done = connect(fake).generate([[2], [2], [2]], SamplingParams(max_new_tokens=3, stop=["\n"]))
    assert [c.finish_reason for c in done] == ["eos", "stop", "length"]
    assert [c.token_ids for c in done] == [[7, 1], [7, 9], [7, 7, 7]]


def test_every_weight_and_memory_endpoint(fake: FakeServer) -> None:
    server = connect(fake, tp_size=2)
    weights = [("model.embed_tokens.weight", torch.ones(2, 3)), ("lm_head.weight", torch.zeros(3))]
    server.update_weights_from_tensor(weights, flush_cache=False)
    [body] = fake.bodies("/update_weights_from_tensor")
    assert len(body["serialized_named_tensors"]) == 2, "one payload per TP rank"
    assert body["flush_cache"] is False and body["load_format"] is None
    names = [n for n, _ in pickle.loads(base64.b64decode(body["serialized_named_tensors"][0]))]
    assert names == ["model.embed_tokens.weight", "lm_head.weight"]
    server.update_weights_from_disk("/ckpt/step_1")
    server.init_weights_update_group("10.0.0.1", 29500, 1, 3, "g", "nccl")
    server.update_weights_from_distributed(["w"], ["bfloat16"], [[2, 3]], "g", False)
    server.destroy_weights_update_group("g")
    server.release_memory_occupation(["weights", "kv_cache"])
    server.resume_memory_occupation(["weights"])
    server.flush_cache()
    assert [e for e, _ in fake.requests] == [
        "/update_weights_from_tensor", "/update_weights_from_disk", "/init_weights_update_group",
        "/update_weights_from_distributed", "/destroy_weights_update_group", "/release_memory_occupation",
        "/resume_memory_occupation", "/flush_cache"]
    assert fake.bodies("/update_weights_from_disk") == [{"model_path": "/ckpt/step_1", "load_format": None}]
    assert fake.bodies("/resume_memory_occupation") == [{"tags": ["weights"]}]
    assert fake.bodies("/update_weights_from_distributed")[0]["shapes"] == [[2, 3]]


@pytest.mark.parametrize(("status", "body", "match"), [
    (400, {"error": {"message": "Input length exceeds the context length"}}, "HTTP 400: Input length exceeds"),
    (400, {"object": "error", "message": "field required", "type": "Bad Request", "code": 400},
     "HTTP 400: field required"),
    (500, "Internal Server Error", "HTTP 500: Internal Server Error"),
    (503, "", "HTTP 503"),
])
def test_http_errors_name_the_endpoint_and_cause(fake: FakeServer, status: int, body: object, match: str) -> None:
    fake.fail("/generate", status, body)
    with pytest.raises(SGLangError, match=f"SGLang /generate answered {match}"):
        connect(fake).generate([[1]], SamplingParams(max_new_tokens=1))


def test_failed_weight_update_raises_sglangs_message(fake: FakeServer) -> None:
    fake.fail("/update_weights_from_disk", 400, {"success": False, "message": "Failed to get weights iterator"})
    with pytest.raises(SGLangError, match="Failed to get weights iterator"):
        connect(fake).update_weights_from_disk("/nowhere")
    fake.fail("/flush_cache", 400, "Cache flushed.\n(When there are running or waiting requests, ...)")
    with pytest.raises(SGLangError, match="/flush_cache answered HTTP 400"):
        connect(fake).flush_cache()


def test_malformed_json_and_timeouts(fake: FakeServer) -> None:
    fake.fail("/generate", 200, "<html>proxy error</html>")
    with pytest.raises(SGLangError, match="invalid JSON"):
        connect(fake).generate([[1]], SamplingParams(max_new_tokens=1))
    fake.delay = 1.0
    with pytest.raises(SGLangError, match="did not answer within 0.2 s"):
        connect(fake, timeout=0.2).generate([[1]], SamplingParams(max_new_tokens=1))


def test_unreachable_server() -> None:
    with pytest.raises(SGLangError, match="cannot reach the SGLang server at http://127.0.0.1:.*rollout.url"):
        SGLangServer(HTTPClient(f"http://127.0.0.1:{free_port()}", 2.0), 1).generate([[1]], SamplingParams())


def test_server_command_line() -> None:
    args = {"model_path": "/models/qwen", "tp_size": 2, "mem_fraction_static": 0.5, "dtype": "bfloat16",
            "random_seed": 3, "enable_memory_saver": True}
    cmd = server_command(args, "127.0.0.1", 31000)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[3:] == ["--host", "127.0.0.1", "--port", "31000", "--model-path", "/models/qwen", "--tp-size", "2",
                       "--mem-fraction-static", "0.5", "--dtype", "bfloat16", "--random-seed", "3",
                       "--enable-memory-saver"]
    assert "--enable-memory-saver" not in server_command({**args, "enable_memory_saver": False}, "127.0.0.1", 1)


@pytest.fixture
def fake_sglang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `sglang.launch_server` stand-in on the launched process's PYTHONPATH (not on this process's)."""
    path = fake_sglang_package(tmp_path / "fake_pkg", TESTS_DIR)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_SGLANG_CHILD_PID_FILE", str(tmp_path / "child.pid"))
    return tmp_path


def test_launched_server_serves_then_stops_with_its_children(fake_sglang: Path, rlcore_tiny_model: Path) -> None:
    port = free_port()
    args = {"model_path": str(rlcore_tiny_model), "tp_size": 1, "mem_fraction_static": 0.5, "dtype": "auto",
            "random_seed": 0, "enable_memory_saver": True}
    process = ServerProcess(server_command(args, "127.0.0.1", port), fake_sglang / "server.log")
    client = HTTPClient(f"http://127.0.0.1:{port}", 10.0)
    try:
        process.wait_ready(client, timeout=60)
        done = SGLangServer(client, 1, process).generate([[5, 6]], SamplingParams(max_new_tokens=2))
        assert len(done[0].token_ids) == 2
        child = int((fake_sglang / "child.pid").read_text())
        assert alive(child)
    finally:
        process.stop(grace=10)
    assert process.process.returncode is not None and not alive(child), "the server and its children are gone"
    assert "fake sglang server on 127.0.0.1" in (fake_sglang / "server.log").read_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_launch_failure_reports_the_log(fake_sglang: Path, tmp_path: Path) -> None:
    args = {"model_path": str(tmp_path / "missing")}
    process = ServerProcess(server_command(args, "127.0.0.1", free_port()), tmp_path / "server.log")
    with pytest.raises(SGLangError, match=r"exited with code 1 while starting(.|\n)*path .*missing does not exist"):
        process.wait_ready(HTTPClient("http://127.0.0.1:1", 1.0), timeout=60)


def test_launch_timeout_stops_the_server(fake_sglang: Path, rlcore_tiny_model: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SGLANG_HANG", "1")
    port = free_port()
    process = ServerProcess(server_command({"model_path": str(rlcore_tiny_model)}, "127.0.0.1", port),
                            fake_sglang / "server.log")
    start = time.monotonic()
    with pytest.raises(SGLangError, match="did not become healthy within 3 s"):
        process.wait_ready(HTTPClient(f"http://127.0.0.1:{port}", 1.0), timeout=3)
    assert time.monotonic() - start < 40
    child = int((fake_sglang / "child.pid").read_text())
    assert process.process.returncode is not None and not alive(child)
