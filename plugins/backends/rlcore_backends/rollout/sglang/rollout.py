"""Rollout with SGLang: its offline `sglang.Engine`, or its HTTP server (at a URL, or launched by rlcore).

Sampling goes through `engine.run_turns` (one completion per repeated prompt, multi-turn tools), so the
batch layout, stop strings and loss masks match every other rollout; prompts with images carry them as
`image_data` next to their token ids (`rollout.images.sample_with_images`); SGLang's `output_token_logprobs`
are the logprobs of softmax(logits / temperature), as rlcore's trainers compute them. `sync_weights`
pushes the trainer's weights by `sync`: tensor (colocated), distributed (NCCL group) or disk. With
`release_memory_between_steps` SGLang frees its weights and KV cache after sampling, so a colocated
trainer gets the GPU memory, and takes them back when the next weights arrive.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch

from rlcore import Interaction, Prompt, RolloutBatch, SamplingParams, Tool, Weights, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.context import RunContext
from rlcore.errors import ConfigError, RLCoreError
from rlcore_backends.common.dtypes import DTYPES as COMMON_DTYPES
from rlcore_backends.common.vision import load_processor
from rlcore_backends.rollout.engine import TurnOptions, run_turns
from rlcore_backends.rollout.images import sample_with_images
from rlcore_backends.rollout.sglang.api import MEMORY_TAGS
from rlcore_backends.rollout.sglang.engines import SGLangEngine, SGLangServer
from rlcore_backends.rollout.sglang.server import ORIGINAL_LOGPROB_ENV, HTTPClient, ServerProcess, free_port, server_command
from rlcore_backends.rollout.sglang.sync import DiskSync, DistributedSync, TensorSync

DTYPES: dict[str, torch.dtype | None] = {"auto": None, **COMMON_DTYPES}


class SGLangRollout:
    """n samples per prompt from SGLang, with weight updates in place of engine restarts."""

    @attrs.define
    class Options(TurnOptions):
        mode: Literal["engine", "server"] = attrs.field(default="engine", validator=check_choice("engine", "server"))
        """engine: an in-process `sglang.Engine` on this node's GPUs; server: SGLang's HTTP server (`url`, or one
        rlcore launches on 127.0.0.1 and stops at the end of the run)."""
        url: str = ""
        """mode=server: URL of a running server, e.g. http://10.0.0.2:30000 (empty: rlcore launches one)."""
        port: int = attrs.field(default=0, validator=check_range(0, 65535))
        """Port of the server rlcore launches (0: any free port)."""
        tp_size: int = attrs.field(default=1, validator=check_range(1))
        """Tensor-parallel GPUs of the engine (with `url`: the server's own --tp-size)."""
        mem_fraction_static: float = attrs.field(default=0.5, validator=check_range(0.05, 0.99))
        """Share of GPU memory SGLang reserves for weights and KV cache; leave room for a colocated trainer."""
        dtype: Literal["auto", "bfloat16", "float16", "float32"] = attrs.field(
            default="auto", validator=check_choice("auto", "bfloat16", "float16", "float32"))
        """Engine weight dtype (auto: the checkpoint's); synced weights are cast to it before sending."""
        sync: Literal["tensor", "distributed", "disk"] = attrs.field(
            default="tensor", validator=check_choice("tensor", "distributed", "disk"))
        """How `sync_weights` reaches SGLang: tensor (same node, CUDA IPC), distributed (NCCL broadcast to a
        server on other GPUs or nodes; mode=server), disk (safetensors in the run directory, then reload)."""
        bucket_mb: int = attrs.field(default=512, validator=check_range(1))
        """Megabytes of weights per update call (sync=tensor and sync=distributed)."""
        release_memory_between_steps: bool = False
        """Free SGLang's weights and KV cache after each `sample` and restore them at the next weight sync;
        starts SGLang with its memory saver (a server given by `url` needs --enable-memory-saver)."""
        timeout: float = attrs.field(default=600.0, validator=check_range(1))
        """Seconds a launched server may take to become healthy, and any one request may take."""
        group_address: str = "127.0.0.1"
        """sync=distributed: this machine's address, which the server's ranks connect to (use its IP when
        the server runs elsewhere)."""
        group_port: int = attrs.field(default=0, validator=check_range(0, 65535))
        """sync=distributed: rendezvous port of the weight-update group (0: any free port)."""

        def __attrs_post_init__(self) -> None:
            if self.sync == "distributed" and self.mode != "server":
                raise ValueError("sync='distributed' broadcasts to a server on other GPUs: set mode='server' (with "
                                 "url), or use sync='tensor' for an in-process engine")
            if self.url and self.mode != "server":
                raise ValueError("url is for mode='server'; set mode='server' or leave url empty")

    def __init__(self, options: Options) -> None:
        self.options = options
        self.engine: SGLangEngine | SGLangServer | None = None
        self.sync: TensorSync | DistributedSync | DiskSync | None = None
        self.tokenizer: Any = None
        self.model_path = ""
        self.last: Weights | None = None
        self.released = False
        self.model_config: Any = None
        self.processor: Any = None

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Start the engine (or connect to the server) on the model, and pick the weight sync."""
        from transformers import AutoConfig

        self.tokenizer, self.model_path = ctx.model.tokenizer, ctx.model.path
        self.model_config = AutoConfig.from_pretrained(ctx.model.path)
        self.engine = self._start(ctx)
        self.sync = self._weight_sync(ctx)

    @hookimpl
    def sample(self, prompts: Sequence[Prompt], params: SamplingParams, tools: Sequence[Tool],
               interaction: Interaction | None) -> RolloutBatch:
        """n responses per prompt (run_turns: each up to its EOS or stop string; tools in several turns), then
        SGLang's memory is freed if `release_memory_between_steps`. Prompts with images (vision-language models)
        are rendered by the model's processor and sent with their images as `image_data`."""
        if self.released:
            self._load(self.last)  # sampled again before new weights came: restore the last ones
        o = self.options
        if any(p.images for p in prompts):
            if self.processor is None:
                self.processor = load_processor(self.model_path, self.tokenizer)
            batch = sample_with_images(self.engine, self.model_config, self.processor, self.tokenizer, prompts,
                                       params, tools, o, interaction)
        else:
            batch = run_turns(self.engine, self.tokenizer, prompts, params, tools, o, interaction)
        if o.release_memory_between_steps:
            self.engine.release_memory_occupation(list(MEMORY_TAGS))
            self.released = True
        return batch

    @hookimpl
    def sync_weights(self, weights: Weights) -> dict[str, float]:
        """Load the trainer's full weights into SGLang; returns the time, buckets and megabytes sent."""
        if weights.adapter:
            raise RLCoreError("the sglang rollout loads full weights only; adapter-only weights are not supported: "
                              "set backend.sync=merged (the lora backend then sends merged full weights), "
                              "or use the vllm rollout, which loads adapters")
        start = time.perf_counter()
        stats = self._load(weights)
        self.last = weights
        return {"sync/seconds": time.perf_counter() - start, **stats}

    @hookimpl
    def teardown(self) -> None:
        """Leave the weight-update group, then shut the engine down (or stop the server rlcore launched)."""
        if self.engine is None:
            return
        try:
            if self.sync is not None:
                self.sync.close(self.engine)
        finally:
            self.engine.close()
            self.engine = None

    def _load(self, weights: Weights | None) -> dict[str, float]:
        """Push `weights` (None: the checkpoint's, from disk), resuming released memory around it:
        weights first (their content is gone after a release), the KV cache after."""
        released = self.released
        if released:
            self.engine.resume_memory_occupation(["weights"])
        if weights is None:
            self.engine.update_weights_from_disk(self.model_path)
            stats: dict[str, float] = {}
        else:
            stats = self.sync.push(self.engine, weights.named_tensors())
        if released:
            self.engine.resume_memory_occupation(["kv_cache"])
            self.released = False
        self.engine.flush_cache()
        return stats

    def _start(self, ctx: RunContext) -> SGLangEngine | SGLangServer:
        """The offline engine, the server at `url` (checked healthy), or a server launched on 127.0.0.1."""
        o = self.options
        args = {"model_path": ctx.model.path, "tp_size": o.tp_size, "mem_fraction_static": o.mem_fraction_static,
                "dtype": o.dtype, "random_seed": ctx.seed, "enable_memory_saver": o.release_memory_between_steps}
        if o.mode == "engine":
            flagged = [v for v in ORIGINAL_LOGPROB_ENV if os.environ.get(v, "").lower() in ("1", "true", "yes")]
            if flagged:
                raise ConfigError(f"{flagged[0]} makes SGLang report logprobs before temperature scaling, which "
                                  "the trainer does not compute: unset it")
            return SGLangEngine.launch(args)
        if o.url:
            server = SGLangServer(HTTPClient(o.url, o.timeout), o.tp_size)
            server.check_health()
            return server
        port = o.port or free_port()
        client = HTTPClient(f"http://127.0.0.1:{port}", o.timeout)
        process = ServerProcess(server_command(args, "127.0.0.1", port), ctx.run_dir / "sglang_server.log")
        try:
            process.wait_ready(client, o.timeout)
        except BaseException:
            process.stop()  # also the children of a launcher that died
            raise
        return SGLangServer(client, o.tp_size, process)

    def _weight_sync(self, ctx: RunContext) -> TensorSync | DistributedSync | DiskSync:
        """The pusher for `sync` (a distributed group is joined at the first sync)."""
        o = self.options
        dtype, bucket = DTYPES[o.dtype], o.bucket_mb << 20
        if o.sync == "tensor":
            return TensorSync(bucket, dtype)
        if o.sync == "disk":
            return DiskSync(ctx.run_dir / "sglang_weights", ctx.model.path, dtype)
        return DistributedSync(o.group_address, o.group_port or free_port(), o.tp_size,
                               ctx.hardware.collective_backend(), ctx.hardware.device(), bucket, dtype, o.timeout)
