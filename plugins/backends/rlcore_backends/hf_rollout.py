"""Rollout with Hugging Face transformers `generate` (KV cache): the CPU default engine.

Samples exactly what `SamplingParams` say: the model's own generation defaults (top-k, repetition
penalty, ...) are dropped, so the sampling distribution is softmax(logits / temperature) with top-p.
The logprob of each sampled token is log_softmax(logits / temperature) before top-p truncation, which is
what the trainer computes; temperature 0 samples greedily and reports logprobs at temperature 1.
Sampling goes through `engine.run_turns`, so multi-turn tool calls work as in every other rollout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import attrs
import torch
from torch import Tensor
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from rlcore import Prompt, RolloutBatch, SamplingParams, Tool, Weights, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.context import RunContext
from rlcore.errors import RLCoreError
from rlcore.models import load_model
from rlcore_backends.engine import Completion, TurnOptions, pad, run_turns
from rlcore_backends.logprobs import token_logprobs
from rlcore_backends.weights import copy_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StopStrings(StoppingCriteria):
    """Stops a row once its generated text contains a stop string, and records how many tokens it had then."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_width: int, rows: int) -> None:
        self.tokenizer, self.stops, self.prompt_width = tokenizer, list(stops), prompt_width
        self.window = max(len(s) for s in stops) + 4
        """Tokens decoded per check: a stop string spans at most one token per character (plus partial bytes)."""
        self.stopped_at = torch.zeros(rows, dtype=torch.long)

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        generated = input_ids[:, self.prompt_width:]
        for row in (self.stopped_at == 0).nonzero().flatten().tolist():
            text = self.tokenizer.decode(generated[row, -self.window:])
            if any(s in text for s in self.stops):
                self.stopped_at[row] = generated.shape[1]
        return (self.stopped_at > 0).to(input_ids.device)


class HFEngine:
    """The `Engine` over a transformers model: batched `generate` calls with left-padded prompts."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: list[int], device: torch.device,
                 max_rows: int) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.device, self.max_rows = device, max_rows

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, `max_rows` prompts per `generate` call."""
        return [c for i in range(0, len(prompts), self.max_rows)
                for c in self._generate(prompts[i:i + self.max_rows], params)]

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        rows = [torch.tensor(p, dtype=torch.long) for p in prompts]
        input_ids = pad(rows, self.tokenizer.pad_token_id, left=True).to(self.device)
        mask = pad([torch.ones_like(r) for r in rows], 0, left=True).to(self.device)
        stop = StopStrings(self.tokenizer, params.stop, input_ids.shape[1], len(rows)) if params.stop else None
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0} \
            if params.temperature > 0 else {"do_sample": False}
        out = self.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=params.max_new_tokens, use_cache=True,
            output_logits=True, return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([stop] if stop else []), **sampling)
        temperature = params.temperature if params.temperature > 0 else 1.0
        new = out.sequences[:, input_ids.shape[1]:]
        logprobs = torch.stack([token_logprobs(step.float() / temperature, new[:, t])
                                for t, step in enumerate(out.logits)], dim=1).cpu()
        generated, width = new.cpu(), new.shape[1]
        is_eos = torch.isin(generated, torch.tensor(self.eos_ids, dtype=torch.long))
        never = width + 1
        eos_len = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, never)
        stop_len = stop.stopped_at.where(stop.stopped_at > 0, never) if stop else torch.full((len(rows),), never)
        completions = []
        for i in range(len(rows)):
            n = min(int(eos_len[i]), int(stop_len[i]), width)
            reason = "eos" if eos_len[i] == n else "stop" if stop_len[i] == n else "length"
            completions.append(Completion(generated[i, :n].tolist(), logprobs[i, :n].tolist(), reason))
        return completions


class HFRollout:
    """n samples per prompt with transformers `generate`, returning the sampled tokens' logprobs."""

    @attrs.define
    class Options(TurnOptions):
        dtype: Literal["float32", "bfloat16"] = attrs.field(
            default="float32", validator=check_choice("float32", "bfloat16"))
        """Weights and compute dtype of the rollout model (bfloat16 is ~2x faster on AMX CPUs, less exact)."""
        max_rows_per_generate: int = attrs.field(default=512, validator=check_range(1))
        """Sequences per `generate` call (prompts times n); bounds the memory of the kept per-step logits."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.engine: HFEngine | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Load the model on the hardware's device and replace its generation defaults by a neutral config."""
        self.device = ctx.hardware.device()
        self.model = load_model(ctx.model, DTYPES[self.options.dtype], self.device).eval().requires_grad_(False)
        self.tokenizer = ctx.model.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        eos_ids = sorted((set(eos) | {self.tokenizer.eos_token_id}) - {None})
        self.model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=self.tokenizer.pad_token_id)
        self.engine = HFEngine(self.model, self.tokenizer, eos_ids, self.device, self.options.max_rows_per_generate)

    @hookimpl
    def sample(self, prompts: Sequence[Prompt], params: SamplingParams, tools: Sequence[Tool]) -> RolloutBatch:
        """n responses per prompt, each up to and including its first EOS (or stop string); `info` holds each
        sample's `finish_reason` (eos, stop or length) and the text keeps the stop string. With tools, the
        multi-turn tool loop of `run_turns` (tool output masked out of the loss)."""
        if any(p.images for p in prompts):
            raise RLCoreError("the hf rollout does not pass images to vision-language models yet: choose a "
                              "text-only task, or a rollout plugin that supports images")
        o = self.options
        with self._rng(params.seed):
            return run_turns(self.engine, self.tokenizer, prompts, params, tools, max_turns=o.max_turns,
                             max_tool_response_tokens=o.max_tool_response_tokens, tool_timeout=o.tool_timeout)

    @hookimpl
    def sync_weights(self, weights: Weights) -> dict[str, float]:
        """Copy the trainer's full weights into the rollout model (cast to its dtype and device)."""
        if weights.adapter:
            raise RLCoreError("the hf rollout loads full weights only; adapter-only weights are not supported yet")
        start = time.perf_counter()
        source = weights.module.state_dict().items() if weights.module is not None else weights.named_tensors()
        copy_weights(self.model, source)
        return {"sync/seconds": time.perf_counter() - start}

    @contextlib.contextmanager
    def _rng(self, seed: int | None) -> Iterator[None]:
        """`params.seed` seeds a forked RNG; without it the global torch RNG is used (and advanced), so a run
        resumed with restored RNG state samples the same."""
        if seed is None:
            yield
            return
        devices = [] if self.device.type == "cpu" else [self.device.index or 0]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            yield
