"""The vllm rollout's pieces that need no vLLM: the server client against a stand-in HTTP server, the
request fields, weight serialisation, and the install hint when vLLM is missing."""

from __future__ import annotations

import base64
import json
import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from rlcore import SamplingParams
from rlcore.config import build_options
from rlcore.errors import ConfigError, PluginError, RLCoreError
from rlcore.testing import make_context
from rlcore_backends.rollout.engine import Completion
from rlcore_backends.rollout.vllm.engines import ServerEngine, finish, request_fields, row_seeds
from rlcore_backends.rollout.vllm.rollout import VLLMRollout, eos_token_ids
from rlcore_backends.rollout.vllm.worker import attach, safetensors_bytes, shared_weights, view


class StandIn(BaseHTTPRequestHandler):
    """Answers the routes a vLLM server offers: completions echo the prompt's last token n times."""

    requests: list[tuple[str, Any]] = []
    dev_mode = True

    def do_GET(self) -> None:
        self.requests.append(("GET " + self.path, None))
        self._send(200, {"data": [{"id": "served-name"}]} if self.path == "/v1/models" else {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)) or b"null")
        self.requests.append(("POST " + self.path, body))
        if self.path == "/v1/completions":
            token = body["prompt"][-1]
            self._send(200, {"choices": [{"token_ids": [token] * 3, "finish_reason": "length", "stop_reason": None,
                                          "logprobs": {"token_logprobs": [-0.5, -0.25, -0.125]}}]})
        elif not self.dev_mode:
            self._send(404, {"detail": "Not Found"})
        elif self.path == "/collective_rpc":
            tensors = load(base64.b64decode(body["args"][0]))
            self._send(200, {"results": [str(float(sum(t.sum() for t in tensors.values())))]})
        else:
            self._send(200, None)

    def _send(self, status: int, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    StandIn.requests, StandIn.dev_mode = [], True
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_server_generate_sends_exact_sampling_and_parses(server: str) -> None:
    engine = ServerEngine(server + "/", stop_token_ids=[2, 7], timeout=10, concurrency=4).connect()
    assert engine.model == "served-name"
    params = SamplingParams(n=5, temperature=0.7, top_p=0.9, max_new_tokens=3, stop=["\n\n"], seed=100)
    out = engine.generate([[1, 2, 11], [3, 12], [13]], params)
    engine.close()
    assert out == [Completion([t] * 3, [-0.5, -0.25, -0.125], "length") for t in (11, 12, 13)]
    bodies = sorted((b for route, b in StandIn.requests if route == "POST /v1/completions"), key=lambda b: b["seed"])
    assert [b["prompt"] for b in bodies] == [[1, 2, 11], [3, 12], [13]]
    assert [b["seed"] for b in bodies] == [100, 101, 102], "one seed per row"
    first = bodies[0]
    assert first["model"] == "served-name" and first["return_token_ids"] is True
    assert {k: first[k] for k in ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens",
                                  "min_tokens", "stop", "stop_token_ids", "include_stop_str_in_output", "logprobs")} == {
        "n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
        "max_tokens": 3, "min_tokens": 0, "stop": ["\n\n"], "stop_token_ids": [2, 7],
        "include_stop_str_in_output": True, "logprobs": 0}


def test_server_weight_sync_sends_safetensors_and_resets_the_cache(server: str) -> None:
    engine = ServerEngine(server, stop_token_ids=[], timeout=10, concurrency=1).connect()
    seconds = engine.load_weights([("a.weight", torch.ones(2, 3)), ("b.bias", torch.full((4,), 2.0))])
    assert seconds == 14.0, "the stand-in answers with the sum of what it decoded"
    routes = [r for r, _ in StandIn.requests]
    assert routes[-2:] == ["POST /collective_rpc", "POST /reset_prefix_cache"]
    assert StandIn.requests[-2][1]["method"] == "rlcore_load_safetensors"
    StandIn.dev_mode = False
    with pytest.raises(RLCoreError, match="refused the weight update .*HTTP 404.*VLLM_SERVER_DEV_MODE=1"):
        engine.load_weights([("a.weight", torch.ones(1))])


def test_unreachable_server_names_the_url() -> None:
    with pytest.raises(RLCoreError, match="cannot reach a vLLM server at http://127.0.0.1:9: .*; check rollout.url"):
        ServerEngine("http://127.0.0.1:9/", stop_token_ids=[], timeout=2, concurrency=1).connect()


def test_finish_reasons() -> None:
    assert finish("length", None) == "length"
    assert finish("stop", None) == "eos" and finish("stop", 151645) == "eos"
    assert finish("stop", "\n\n") == "stop"
    with pytest.raises(RLCoreError, match="finish_reason='abort'"):
        finish("abort", None)


def test_request_fields_and_seeds() -> None:
    fields = request_fields(SamplingParams(temperature=0.0, max_new_tokens=9), [1], seed=None)
    assert fields["temperature"] == 0.0 and fields["max_tokens"] == 9 and fields["seed"] is None
    assert row_seeds(None, 3) == [None] * 3 and row_seeds(5, 3) == [5, 6, 7]


def test_safetensors_bytes_keeps_the_embedding_of_tied_tensors() -> None:
    embed, norm = torch.randn(5, 3), torch.ones(3)
    for order in ([("model.embed_tokens.weight", embed), ("lm_head.weight", embed)],
                  [("lm_head.weight", embed), ("model.embed_tokens.weight", embed)]):
        tensors = load(safetensors_bytes([*order, ("model.norm.weight", norm), ("empty", torch.empty(0))]))
        assert sorted(tensors) == ["empty", "model.embed_tokens.weight", "model.norm.weight"]
        assert torch.equal(tensors["model.embed_tokens.weight"], embed)
    untied = load(safetensors_bytes([("model.embed_tokens.weight", embed), ("lm_head.weight", embed.clone())]))
    assert sorted(untied) == ["lm_head.weight", "model.embed_tokens.weight"]


def test_eos_ids_join_generation_config_and_tokenizer(rlcore_tiny_model: Path, tmp_path: Path) -> None:
    ctx = make_context(tmp_path, Path(shutil.copytree(rlcore_tiny_model, tmp_path / "model")))
    assert eos_token_ids(ctx.model.path, ctx.model.tokenizer) == [1]
    (Path(ctx.model.path) / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 1]}))
    assert eos_token_ids(ctx.model.path, ctx.model.tokenizer) == [1, 4]


def test_missing_vllm_names_the_extra(rlcore_context: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(PluginError, match=r"pip install 'rlcore-backends\[vllm\]'"):
        VLLMRollout(VLLMRollout.Options()).setup(ctx=rlcore_context)


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="rollout.mode: expected one of 'offline', 'server'"):
        build_options(VLLMRollout.Options, {"mode": "remote"}, "rollout")
    with pytest.raises(ConfigError, match="gpu_memory_utilization=1.5 must be in"):
        build_options(VLLMRollout.Options, {"gpu_memory_utilization": 1.5}, "rollout")
    options = build_options(VLLMRollout.Options, {"url": "http://h:8000", "max_turns": "2"}, "rollout")
    assert (options.url, options.max_turns) == ("http://h:8000", 2)


def test_shared_weights_round_trip_and_free_the_block() -> None:
    """What a worker reads back from the block equals what was sent, for every dtype; the block is gone after."""
    sent = [("a", torch.randn(3, 5)), ("b", torch.arange(7, dtype=torch.int64)), ("c", torch.randn(2, 2).bfloat16()),
            ("d", torch.randn(4, 6)[:, ::2]), ("e", torch.tensor(2.5, dtype=torch.float16))]
    with shared_weights(sent) as (block, layout), attach(block) as data:
        got = {name: view(data, dtype, shape, offset).clone() for name, dtype, shape, offset in layout}
    assert all(offset % 64 == 0 for *_, offset in layout)
    for name, tensor in sent:
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    with pytest.raises(FileNotFoundError), attach(block):
        pass
