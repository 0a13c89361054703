"""Schema doubles of SGLang for CPU tests (SGLang itself cannot run on these machines).

- `validate`: checks a request body against SGLang's documented schemas (`io_struct.GenerateReqInput`,
  `SamplingParams`, the weight-update and memory request dataclasses; see docs/advanced_features/
  sglang_for_rl.md and docs/basic_usage/sampling_params.md in sgl-project/sglang).
- `FakeServer`: a real `http.server` on 127.0.0.1 that validates every request and answers in the documented
  shapes (JSON lists of outputs, `{"success", "message"}`, text for /flush_cache, null for memory calls),
  with injectable failures. Run as a script it is also a fake `python -m sglang.launch_server` (same flags)
  that can join a gloo weight-update group and receive broadcasts, like SGLang's TP ranks do over NCCL.
- `FakeEngine`: an object with `sglang.Engine`'s method signatures, generating with a real transformers
  model (so weight updates change its logprobs); it is a double of the API, not of SGLang's kernels.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SAMPLING_KEYS = {"max_new_tokens": int, "stop": (str, list), "stop_token_ids": list, "temperature": (int, float),
                 "top_p": (int, float), "top_k": int, "min_p": (int, float), "frequency_penalty": (int, float),
                 "presence_penalty": (int, float), "repetition_penalty": (int, float), "min_new_tokens": int,
                 "n": int, "ignore_eos": bool, "skip_special_tokens": bool, "spaces_between_special_tokens": bool,
                 "no_stop_trim": bool, "sampling_seed": int, "json_schema": str, "regex": str, "ebnf": str,
                 "custom_params": dict}
SCHEMAS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # endpoint: (required fields, optional fields), each name -> accepted type(s)
    "/generate": ({}, {"text": (str, list), "input_ids": list, "sampling_params": (dict, list),
                       "return_logprob": (bool, list), "logprob_start_len": (int, list),
                       "top_logprobs_num": (int, list),
                       "return_text_in_logprobs": bool, "stream": bool, "rid": (str, list), "lora_path": (str, list),
                       "image_data": list}),
    "/update_weights_from_tensor": ({"serialized_named_tensors": list},
                                    {"load_format": (str, type(None)), "flush_cache": bool,
                                     "abort_all_requests": bool, "weight_version": (str, type(None))}),
    "/update_weights_from_disk": ({"model_path": str}, {"load_format": (str, type(None)), "abort_all_requests": bool,
                                                       "weight_version": (str, type(None)), "flush_cache": bool}),
    "/init_weights_update_group": ({"master_address": str, "master_port": int, "rank_offset": int, "world_size": int},
                                   {"group_name": str, "backend": str}),
    "/update_weights_from_distributed": ({"names": list, "dtypes": list, "shapes": list},
                                         {"group_name": str, "flush_cache": bool, "abort_all_requests": bool,
                                          "weight_version": (str, type(None)), "load_format": (str, type(None))}),
    "/destroy_weights_update_group": ({}, {"group_name": str}),
    "/release_memory_occupation": ({}, {"tags": (list, type(None))}),
    "/resume_memory_occupation": ({}, {"tags": (list, type(None))}),
    "/flush_cache": ({}, {}),
}
TESTS_DIR = str(Path(__file__).parent)
DTYPES = ("float32", "bfloat16", "float16", "int64", "int32", "uint8", "bool")


def validate(endpoint: str, body: Any) -> list[str]:
    """Everything in `body` that SGLang's request schema for `endpoint` would reject."""
    if endpoint not in SCHEMAS:
        return [f"unknown endpoint {endpoint}"]
    if not isinstance(body, dict):
        return [f"body must be a JSON object, got {type(body).__name__}"]
    required, optional = SCHEMAS[endpoint]
    problems = [f"missing {k}" for k in required if k not in body]
    for key, value in body.items():
        kind = required.get(key, optional.get(key))
        if kind is None:
            problems.append(f"unexpected field {key}")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{key} has type {type(value).__name__}")
    if endpoint == "/generate":
        problems += _check_generate(body)
    if endpoint in ("/release_memory_occupation", "/resume_memory_occupation"):
        problems += [f"unknown tag {t}" for t in body.get("tags") or [] if t not in ("kv_cache", "weights")]
    if endpoint == "/update_weights_from_distributed":
        n = len(body.get("names", []))
        if not (len(body.get("dtypes", [])) == len(body.get("shapes", [])) == n):
            problems.append("names, dtypes and shapes differ in length")
        problems += [f"unknown dtype {d}" for d in body.get("dtypes", []) if d not in DTYPES]
    if endpoint == "/update_weights_from_tensor":
        problems += ["serialized_named_tensors must hold strings" for s in body.get("serialized_named_tensors", [])
                     if not isinstance(s, str)][:1]
    return problems


def _check_generate(body: dict[str, Any]) -> list[str]:
    problems = []
    ids = body.get("input_ids")
    if ("text" in body) == (ids is not None):
        problems.append("give exactly one of text and input_ids")
    if ids is not None and not (ids and all(isinstance(r, list) and r and all(isinstance(t, int) for t in r)
                                            for r in ids)):
        problems.append("input_ids must be a non-empty list of non-empty token lists")
    images = body.get("image_data")
    if images is not None and ids is not None:
        if len(images) != len(ids) or not all(isinstance(row, list) for row in images):
            problems.append("image_data must hold one list of images per prompt")
        elif not all(isinstance(item, str) and item.startswith("data:image/") or _is_pil(item)
                     for row in images for item in row):
            problems.append("image_data items must be images: data URLs (HTTP) or PIL images (Engine)")
    sps = body.get("sampling_params") or {}
    sps = sps if isinstance(sps, list) else [sps]
    if ids is not None and len(sps) > 1 and len(sps) != len(ids):
        problems.append("one sampling_params per prompt, or one for all")
    for sp in sps:
        for key, value in sp.items():
            kind = SAMPLING_KEYS.get(key)
            if kind is None:
                problems.append(f"unknown sampling param {key}")
            elif not isinstance(value, kind):
                problems.append(f"sampling param {key} has type {type(value).__name__}")
    return problems


def _is_pil(item: Any) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image)


def decode_image(item: Any) -> Any:
    """A PIL image from an `image_data` item: a PIL image, or a base64 data URL (what SGLang's load_image reads)."""
    import io

    from PIL import Image

    if _is_pil(item):
        return item
    return Image.open(io.BytesIO(base64.b64decode(item.split(",", 1)[1]))).convert("RGB")


def toy_output(ids: list[int], sp: dict[str, Any], index: int) -> dict[str, Any]:
    """A documented-shape output: max_new_tokens tokens after the prompt, finished by length."""
    n = sp.get("max_new_tokens", 128)
    tokens = [(sum(ids) + 7 * k + index) % 40 + 3 for k in range(n)]
    return {"text": "", "output_ids": tokens,
            "meta_info": {"id": f"req{index}", "prompt_tokens": len(ids), "completion_tokens": n,
                          "finish_reason": {"type": "length", "length": n},
                          "output_token_logprobs": [[-0.25 * (k + 1), t, None] for k, t in enumerate(tokens)]}}


class FakeServer:
    """A threaded HTTP server speaking SGLang's documented API on 127.0.0.1 (start with `with`)."""

    def __init__(self, port: int = 0, group: bool = False) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.violations: list[str] = []
        self.failures: dict[str, tuple[int, bytes]] = {}
        self.outputs: list[dict[str, Any]] | None = None
        self.delay = 0.0
        self.health = 200
        self.group = group
        self.received: dict[str, float] = {}
        self.images: list[list[Any]] = []
        """The images of every /generate row, decoded (one list per row)."""
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail(self, endpoint: str, status: int, body: str | dict[str, Any]) -> None:
        """Answer the next request to `endpoint` with `status` and `body` (a dict is sent as JSON)."""
        self.failures[endpoint] = (status, (json.dumps(body) if isinstance(body, dict) else body).encode())

    def bodies(self, endpoint: str) -> list[Any]:
        return [b for e, b in self.requests if e == endpoint]

    def answer(self, endpoint: str, body: Any) -> tuple[int, Any]:
        """(status, JSON-able answer or text) for a valid request."""
        if endpoint == "/generate":
            ids = body["input_ids"]
            sps = body.get("sampling_params") or {}
            sps = sps if isinstance(sps, list) else [sps] * len(ids)
            outputs = self.outputs or [toy_output(r, sp, i) for i, (r, sp) in enumerate(zip(ids, sps))]
            self.images += [[decode_image(item) for item in row] for row in body.get("image_data") or [[] for _ in ids]]
            return 200, outputs[:len(ids)]
        if endpoint == "/flush_cache":
            return 200, "Cache flushed.\nPlease check backend logs for more details.\n"
        if endpoint in ("/release_memory_occupation", "/resume_memory_occupation"):
            return 200, None
        if endpoint == "/init_weights_update_group" and self.group:
            _join_group(body)
        if endpoint == "/update_weights_from_distributed" and self.group:
            self.received.update(_receive(body))
        if endpoint == "/debug/received":
            return 200, self.received
        return 200, {"success": True, "message": "Succeeded to update model weights."}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/health":
                    self._reply(server.health, b"", "text/plain")
                else:
                    self._reply(404, b'{"detail":"Not Found"}', "application/json")

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                endpoint = self.path
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = None
                server.requests.append((endpoint, body))
                time.sleep(server.delay)
                if endpoint in server.failures:
                    status, payload = server.failures.pop(endpoint)
                    return self._reply(status, payload, "application/json")
                problems = validate(endpoint, body) if endpoint != "/debug/received" else []
                if problems:
                    server.violations += [f"{endpoint}: {p}" for p in problems]
                    error = {"object": "error", "message": "; ".join(problems), "type": "Bad Request", "code": 400}
                    return self._reply(400, json.dumps(error).encode(), "application/json")
                status, answer = server.answer(endpoint, body)
                if isinstance(answer, str):
                    self._reply(status, answer.encode(), "text/plain")
                else:
                    self._reply(status, json.dumps(answer).encode(), "application/json")

            def _reply(self, status: int, payload: bytes, kind: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def _join_group(body: dict[str, Any]) -> None:
    """Join the weight-update group as SGLang's TP rank 0 does (rank_offset), over gloo on CPU."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(backend=body.get("backend", "gloo"), rank=body["rank_offset"],
                            init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                            world_size=body["world_size"], timeout=datetime.timedelta(seconds=60))


def _receive(body: dict[str, Any]) -> dict[str, float]:
    """Receive the announced tensors from rank 0, in order; returns each one's sum."""
    import torch
    import torch.distributed as dist

    sums = {}
    for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        dist.broadcast(tensor, src=0)
        sums[name] = float(tensor.double().sum())
    return sums


def launch_server_main(argv: list[str] | None = None) -> None:
    """`python -m sglang.launch_server` stand-in: SGLang's flags (argparse rejects any other), a child process
    like SGLang's scheduler when FAKE_SGLANG_CHILD_PID_FILE names a file for its pid, then the fake server."""
    parser = argparse.ArgumentParser(prog="sglang.launch_server")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"], default="auto")
    parser.add_argument("--random-seed", type=int)
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--group", action="store_true", help="(test only) join weight-update groups over gloo")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model_path):
        sys.exit(f"ValueError: model path {args.model_path} does not exist")
    if os.environ.get("FAKE_SGLANG_CHILD_PID_FILE"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["FAKE_SGLANG_CHILD_PID_FILE"], "w") as f:
            f.write(str(child.pid))
    if os.environ.get("FAKE_SGLANG_HANG"):
        time.sleep(600)
    print(f"fake sglang server on {args.host}:{args.port} for {args.model_path}", flush=True)
    server = FakeServer(args.port, group=args.group)
    server.httpd.serve_forever(poll_interval=0.05)


class FakeEngine:
    """`sglang.Engine` double: the same constructor and method signatures, a transformers model inside.

    Generation runs through rlcore's HF engine row by row and is reported in SGLang's output shape;
    `update_weights_from_tensor` copies the named tensors into that model (by Hugging Face name).
    """

    instances: list[FakeEngine] = []
    ENGINE_ARGS = {"model_path", "tokenizer_path", "tp_size", "mem_fraction_static", "dtype", "random_seed",
                   "enable_memory_saver", "log_level", "skip_tokenizer_init", "port", "host"}

    def __init__(self, **kwargs: Any) -> None:
        from rlcore import ModelSpec
        from rlcore.models import load_model, load_tokenizer
        from rlcore_backends.rollout.hf.rollout import HFEngine

        unknown = set(kwargs) - self.ENGINE_ARGS
        assert not unknown, f"sglang.Engine got arguments that are not ServerArgs fields: {unknown}"
        self.kwargs = kwargs
        self.tokenizer = load_tokenizer(kwargs["model_path"])
        self.model = load_model(ModelSpec(kwargs["model_path"], self.tokenizer)).eval().requires_grad_(False)
        self.eos = self.tokenizer.eos_token_id
        self.hf = HFEngine(self.model, self.tokenizer, [self.eos], self.model.device, 64)
        self.processor: Any = None
        """A vision-language model's processor, loaded at the first request with images."""
        self.calls: list[tuple[str, Any]] = []
        self.released: set[str] = set()
        self.shut_down = False
        FakeEngine.instances.append(self)

    def generate(self, prompt: Any = None, sampling_params: Any = None, input_ids: Any = None,
                 return_logprob: Any = False, **kwargs: Any) -> list[dict[str, Any]]:
        from rlcore import SamplingParams

        body = {"input_ids": input_ids, "sampling_params": sampling_params, "return_logprob": return_logprob,
                **({"text": prompt} if prompt is not None else {}), **kwargs}
        problems = validate("/generate", body)
        assert not problems and return_logprob is True, problems
        assert not self.released, f"generate while {self.released} are released"
        self.calls.append(("generate", body))
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        images = kwargs.get("image_data") or [[] for _ in input_ids]
        outputs = []
        for ids, sp, row_images in zip(input_ids, sps, images):
            params = SamplingParams(n=1, temperature=sp["temperature"], top_p=sp["top_p"],
                                    max_new_tokens=sp["max_new_tokens"], stop=sp.get("stop", []))
            done = self.hf.generate([ids], params, multimodal=[self._vision(ids, row_images)] if row_images else None)[0]
            text = self.tokenizer.decode(done.token_ids)
            matched = {"eos": self.eos, "length": None,
                       "stop": next((s for s in params.stop if s in text), None)}[done.finish_reason]
            reason = ({"type": "length", "length": len(done.token_ids)} if done.finish_reason == "length"
                      else {"type": "stop", "matched": matched})
            outputs.append({"text": text, "output_ids": done.token_ids, "meta_info": {
                "id": str(len(outputs)), "prompt_tokens": len(ids), "completion_tokens": len(done.token_ids),
                "finish_reason": reason,
                "output_token_logprobs": [(lp, t, None) for lp, t in zip(done.logprobs, done.token_ids)]}})
        return outputs

    def _vision(self, ids: list[int], images: list[Any]) -> dict[str, Any]:
        """What SGLang's processor makes of a row's images (pixel values, grids), after checking the row has one
        expanded placeholder run per image, as the image's patch grid sizes it."""
        from rlcore_backends.common.vision import load_processor

        if self.processor is None:
            self.processor = load_processor(self.kwargs["model_path"], self.tokenizer)
        vision = dict(self.processor.image_processor(images=[decode_image(i) for i in images], return_tensors="pt"))
        config = self.model.config
        assert ids.count(config.vision_start_token_id) == len(images), "one placeholder run per image"
        assert ids.count(config.image_token_id) == int(vision["image_grid_thw"].prod(-1).sum()) // 4, \
            "the placeholders are expanded: one per merged patch"
        return vision

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, Any]], load_format: str | None = None,
                                   flush_cache: bool = True) -> tuple[bool, str]:
        self.calls.append(("update_weights_from_tensor", [n for n, _ in named_tensors]))
        assert "weights" not in self.released, "weights updated while released"
        state = self.model.state_dict()
        missing = [n for n, _ in named_tensors if n not in state]
        if missing:
            return False, f"unknown parameters {missing}"
        for name, tensor in named_tensors:
            state[name].copy_(tensor)
        return True, "Succeeded to update model weights."

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None) -> tuple[bool, str, int]:
        from rlcore_backends.common.weights import read_safetensors

        self.calls.append(("update_weights_from_disk", model_path))
        state = self.model.state_dict()
        for name, tensor in read_safetensors(Path(model_path)).items():
            state[name].copy_(tensor)
        return True, "Succeeded to update model weights.", 0

    def flush_cache(self) -> Any:
        self.calls.append(("flush_cache", None))
        return type("FlushCacheReqOutput", (), {"success": True})()

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.calls.append(("release_memory_occupation", tags))
        self.released |= set(tags or ["weights", "kv_cache"])

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.calls.append(("resume_memory_occupation", tags))
        self.released -= set(tags or ["weights", "kv_cache"])

    def shutdown(self) -> None:
        self.shut_down = True


def fake_sglang_package(directory: Path, tests_dir: str) -> str:
    """Write a `sglang` package whose `launch_server` module runs `launch_server_main`; returns the
    PYTHONPATH entry to give the launched process."""
    pkg = directory / "sglang"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "launch_server.py").write_text(
        f"import sys\nsys.path.insert(0, {tests_dir!r})\nfrom sglang_fake import launch_server_main\n"
        "launch_server_main()\n")
    return str(directory)


def pickle_serializer(obj: object) -> str:
    """Stands in for `MultiprocessingSerializer.serialize(obj, output_str=True)` (base64 text of a pickle)."""
    return base64.b64encode(pickle.dumps(obj)).decode()


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
