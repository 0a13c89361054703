"""Two `Engine`s over vLLM: its offline `LLM` in this process group, and an OpenAI-compatible vLLM server.

Both sample with vLLM's `processed_logprobs` mode, so the logprob of each sampled token is of logits /
temperature (as the trainer computes it; with top_p < 1 vLLM reports it under the top-p renormalised
distribution it sampled from). Weights arrive through `RLCoreWorkerExtension` (`rollout/vllm/worker.py`).
Prompts with images pass them next to their token ids (placeholders already expanded by rlcore's processor):
offline as `multi_modal_data`, to a server through `/inference/v1/generate` (`--enable-scale-out`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch import Tensor

from rlcore import SamplingParams
from rlcore.errors import RLCoreError
from rlcore_backends.common.vision import ENGINE_IMAGES, png_data_url
from rlcore_backends.rollout.engine import Completion
from rlcore_backends.rollout.vllm.worker import safetensors_bytes, shared_weights

EXTENSION = "rlcore_backends.rollout.vllm.worker.RLCoreWorkerExtension"
SERVED_NAME = "rlcore-policy"


def request_fields(params: SamplingParams, stop_token_ids: Sequence[int], seed: int | None) -> dict[str, Any]:
    """vLLM sampling fields for one completion: exactly `params`, nothing from the model's generation
    defaults (top-k, repetition penalty), the sampled token's logprob, stop strings kept in the output."""
    return {"n": 1, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0, "min_p": 0.0,
            "repetition_penalty": 1.0, "max_tokens": params.max_new_tokens,
            "min_tokens": params.min_new_tokens, "stop": list(params.stop),
            "stop_token_ids": list(stop_token_ids), "include_stop_str_in_output": True, "logprobs": 0,
            "seed": seed}


def finish(reason: str | None, stop_reason: int | str | None) -> str:
    """rlcore's finish reason from vLLM's: a matched stop string is "stop", an EOS or stop token is "eos"."""
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    raise RLCoreError(f"vLLM ended a request with finish_reason={reason!r} (aborted or failed); see its log")


def row_seeds(seed: int | None, rows: int) -> list[int | None]:
    """One seed per row (a shared seed would make the n samples of a prompt identical)."""
    return [None if seed is None else seed + i for i in range(rows)]


class AdapterDirs:
    """Numbered peft adapter directories (adapter_config.json, adapter_model.safetensors) in a private temporary
    directory, on tmpfs (/dev/shm) where there is one: vLLM's LoRA loader reads an adapter from a path."""

    def __init__(self) -> None:
        shm = Path("/dev/shm")
        self.root = Path(tempfile.mkdtemp(prefix="rlcore-lora-", dir=shm if shm.is_dir() else None))
        self.count = 0

    def write(self, named: list[tuple[str, Tensor]], config: dict[str, Any]) -> tuple[int, Path]:
        """A new directory holding these adapters; returns its number (1, 2, ...: vLLM's `lora_int_id`) and path."""
        from safetensors.torch import save_file

        self.count += 1
        directory = self.root / f"v{self.count}"
        directory.mkdir()
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in named}
        save_file(tensors, directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text(json.dumps(config))
        return self.count, directory

    def drop_older(self, number: int) -> None:
        """Delete the directories before `number` (the engine has loaded `number`)."""
        for old in self.root.glob("v*"):
            if int(old.name[1:]) < number:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class OfflineEngine:
    """vLLM's offline `LLM` colocated with the trainer: the engine runs in its own processes and weights
    reach them through shared memory (`collective_rpc` carries only the block's name and layout)."""

    def __init__(self, path: str, dtype: str, seed: int, stop_token_ids: list[int],
                 engine_args: dict[str, Any]) -> None:
        from vllm import LLM

        self.stop_token_ids = stop_token_ids
        self.lora_enabled = bool(engine_args.get("enable_lora"))
        self.adapters = AdapterDirs() if self.lora_enabled else None
        self.lora: Any = None
        """The `LoRARequest` of the adapter last synced (applied to every request), or None."""
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, seed=seed, enforce_eager=True,
                       logprobs_mode="processed_logprobs", worker_extension_cls=EXTENSION, disable_log_stats=True,
                       **engine_args)
        if dtype == "bfloat16":
            self.llm.collective_rpc("rlcore_init_amx")

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 multimodal: list[dict[str, Any]] | None = None) -> list[Completion]:
        """One completion per token-id prompt, in one batched `LLM.generate` call; a row with images (in
        `multimodal[i][ENGINE_IMAGES]`) passes them as the prompt's `multi_modal_data`."""
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = [VLLMSamplingParams(**request_fields(params, self.stop_token_ids, s))
                    for s in row_seeds(params.seed, len(prompts))]
        inputs = []
        for i, prompt in enumerate(prompts):
            images = (multimodal[i] if multimodal else {}).get(ENGINE_IMAGES)
            inputs.append({"prompt_token_ids": prompt, **({"multi_modal_data": {"image": images}} if images else {})})
        outs = self.llm.generate(inputs, sampling, use_tqdm=False, lora_request=self.lora)
        completions = []
        for out in outs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            completions.append(Completion(ids, [lp[t].logprob for lp, t in zip(o.logprobs, ids)],
                                          finish(o.finish_reason, o.stop_reason)))
        return completions

    def load_weights(self, named: list[tuple[str, Tensor]]) -> float:
        """Load full weights into every worker through one shared-memory block and drop the prefix cache (its
        KV came from old weights); returns the seconds the workers spent loading."""
        with shared_weights(named) as (block, layout):
            seconds = self.llm.collective_rpc("rlcore_load_shared", args=(block, layout))
        if self.lora is not None:  # full weights are the whole policy: an adapter synced before no longer applies
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            self.lora = None
        self.llm.reset_prefix_cache()
        if self.llm.llm_engine.model_config.is_multimodal_model:
            self.llm.llm_engine.reset_encoder_cache()  # image features computed by the old vision tower
        return max(seconds)

    def load_adapter(self, named: list[tuple[str, Tensor]], config: dict[str, Any]) -> float:
        """Load a LoRA adapter (peft names and config) as a new vLLM adapter that every later request uses,
        unload the previous one and drop the prefix cache; returns the seconds vLLM took to load it."""
        from vllm.lora.request import LoRARequest

        number, directory = self.adapters.write(named, config)
        request = LoRARequest(f"rlcore-{number}", number, str(directory))
        start = time.perf_counter()
        if not self.llm.llm_engine.add_lora(request):
            raise RLCoreError(f"vLLM did not load the adapter written to {directory}")
        seconds = time.perf_counter() - start
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
        self.lora = request
        self.adapters.drop_older(number)
        self.llm.reset_prefix_cache()
        return seconds

    def close(self) -> None:
        """Stop the engine's processes."""
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        if self.adapters is not None:
            self.adapters.close()


class ServerEngine:
    """A vLLM OpenAI-compatible server: one at `url`, or one started here on 127.0.0.1 and stopped by `close`.

    Weight updates use the server's dev-mode `/collective_rpc` route, so a server given by URL must run with
    `VLLM_SERVER_DEV_MODE=1` and `--worker-extension-cls rlcore_backends.rollout.vllm.worker.RLCoreWorkerExtension`.
    """

    def __init__(self, url: str, stop_token_ids: list[int], timeout: float, concurrency: int) -> None:
        self.url, self.stop_token_ids, self.timeout = url.rstrip("/"), stop_token_ids, timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vllm-request")
        self.model = ""
        """The name requests ask for: the served model, or the adapter last synced."""
        self.lora_enabled = False
        self.adapters: AdapterDirs | None = None
        self.adapter_name: str | None = None
        self.images = False
        """Whether the model takes images (its encoder cache is reset after each weight update)."""

    @classmethod
    def start(cls, path: str, dtype: str, seed: int, stop_token_ids: list[int], engine_args: dict[str, Any],
              log: Path, startup_timeout: float, timeout: float, concurrency: int) -> ServerEngine:
        """Launch `vllm.entrypoints.openai.api_server` on a free loopback port and wait until it is healthy."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
                "--port", str(port), "--dtype", dtype, "--seed", str(seed), "--enforce-eager",
                "--served-model-name", SERVED_NAME, "--logprobs-mode", "processed_logprobs",
                "--worker-extension-cls", EXTENSION, "--generation-config", "vllm", "--disable-log-stats"]
        if engine_args.get("limit_mm_per_prompt"):
            args.append("--enable-scale-out")  # the token-ids-in `/inference/v1/generate` route, which takes images
        for key, value in engine_args.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, dict):
                args += [flag, json.dumps(value)]
            elif value is not None:
                args += [flag, str(value)]
        engine = cls(f"http://127.0.0.1:{port}", stop_token_ids, timeout, concurrency)
        engine.images = bool(engine_args.get("limit_mm_per_prompt"))
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        if engine_args.get("enable_lora"):
            engine.lora_enabled, engine.adapters = True, AdapterDirs()
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # the /v1/load_lora_adapter route
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            engine.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                              env=env)
        deadline = time.monotonic() + startup_timeout
        while not engine._healthy():
            if engine.process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RLCoreError(f"the vLLM server exited with status {engine.process.returncode} while starting; "
                                  f"its log ({log}) ends:\n{tail}")
            if time.monotonic() > deadline:
                engine.close()
                raise RLCoreError(f"the vLLM server did not become healthy within {startup_timeout:g} s (log: {log});"
                                  " raise rollout.startup_timeout on a slow machine")
            time.sleep(0.5)
        return engine

    def connect(self) -> ServerEngine:
        """Check the server answers and learn the name it serves the model under."""
        try:
            models = self._request("GET", "/v1/models")
        except RLCoreError as e:
            raise RLCoreError(f"cannot reach a vLLM server at {self.url}: {e}; check rollout.url") from None
        self.model = models["data"][0]["id"]
        return self

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 multimodal: list[dict[str, Any]] | None = None) -> list[Completion]:
        """One request per prompt, sent concurrently (the server batches them): `/v1/completions` for text,
        vLLM's token-ids-in `/inference/v1/generate` for a row with images (sent as PNG data URLs)."""
        def one(prompt: list[int], seed: int | None, inputs: dict[str, Any]) -> Completion:
            fields = request_fields(params, self.stop_token_ids, seed)
            images = inputs.get(ENGINE_IMAGES)
            if images:
                return self._generate_with_images(prompt, fields, images)
            body = {"model": self.model, "prompt": prompt, "return_token_ids": True, "skip_special_tokens": True,
                    **fields}
            choice = self._request("POST", "/v1/completions", body)["choices"][0]
            ids = list(choice["token_ids"])
            logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
            return Completion(ids, logprobs, finish(choice["finish_reason"], choice.get("stop_reason")))

        rows = multimodal or [{} for _ in prompts]
        return list(self.pool.map(one, prompts, row_seeds(params.seed, len(prompts)), rows))

    def _generate_with_images(self, prompt: list[int], fields: dict[str, Any], images: list[Any]) -> Completion:
        body = {"model": self.model, "token_ids": prompt, "sampling_params": fields,
                "content_parts": [{"type": "image_url", "url": png_data_url(image)} for image in images]}
        try:
            choice = self._request("POST", "/inference/v1/generate", body)["choices"][0]
        except RLCoreError as e:
            if "HTTP 404" not in str(e):
                raise
            raise RLCoreError(f"the vLLM server at {self.url} has no /inference/v1/generate route, which takes token "
                              "ids with images: start it with --enable-scale-out (a server rlcore starts for a "
                              "vision-language model has it)") from None
        ids = list(choice["token_ids"])
        logprobs = [float(entry["logprob"]) for entry in choice["logprobs"]["content"]]
        return Completion(ids, logprobs, finish(choice["finish_reason"], choice.get("stop_reason")))

    def load_weights(self, named: list[tuple[str, Tensor]]) -> float:
        """Send the weights (in-memory safetensors, base64 in the JSON body) and reset the prefix cache."""
        blob = base64.b64encode(safetensors_bytes(named)).decode("ascii")
        try:
            out = self._request("POST", "/collective_rpc", {"method": "rlcore_load_safetensors", "args": [blob]})
            if self.adapter_name is not None:  # full weights are the whole policy: the old adapter no longer applies
                self._request("POST", "/v1/unload_lora_adapter", {"lora_name": self.adapter_name})
                self.model, self.adapter_name = SERVED_NAME, None
            self._request("POST", "/reset_prefix_cache")
            if self.images:
                self._request("POST", "/reset_encoder_cache")  # image features computed by the old vision tower
        except RLCoreError as e:
            raise RLCoreError(f"the vLLM server at {self.url} refused the weight update ({e}): run it with "
                              f"VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls {EXTENSION}") from None
        return max(float(s) for s in out["results"])

    def load_adapter(self, named: list[tuple[str, Tensor]], config: dict[str, Any]) -> float:
        """Write the adapter to a local directory, load it with `/v1/load_lora_adapter` under a new name that
        later requests ask for, unload the previous one and reset the prefix cache; returns the load's seconds."""
        number, directory = self.adapters.write(named, config)
        name = f"rlcore-{number}"
        start = time.perf_counter()
        self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(directory)})
        seconds = time.perf_counter() - start
        if self.adapter_name is not None:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": self.adapter_name})
        self.model = self.adapter_name = name
        self.adapters.drop_older(number)
        self._request("POST", "/reset_prefix_cache")
        return seconds

    def close(self) -> None:
        """Stop the server this engine started (SIGTERM to its process group, SIGKILL after 30 s)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.adapters is not None:
            self.adapters.close()
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _request(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        """JSON request to the server (its JSON answer, or its text); HTTP and connection errors become
        RLCoreError with the server's message."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            raise RLCoreError(f"{method} {route} -> HTTP {e.code}: {e.read()[:500].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RLCoreError(f"{method} {route} failed: {e}") from None
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:  # a plain-text answer (the LoRA routes answer "Success: ...")
            return text.decode(errors="replace")
