"""Rollout with Hugging Face transformers models and the KV cache: the CPU default engine.

Samples exactly what `SamplingParams` say: the model's own generation defaults (top-k, repetition
penalty, ...) are dropped, so the sampling distribution is softmax(logits / temperature) with top-p.
The logprob of each sampled token is log_softmax(logits / temperature) before top-p truncation, which is
what the trainer computes; temperature 0 samples greedily and reports logprobs at temperature 1.
Plain text models decode in rlcore's own loop (`hf_decode.decode`), others through transformers `generate`.
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
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from rlcore import Interaction, Prompt, RolloutBatch, SamplingParams, Tool, Weights, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.context import RunContext
from rlcore.errors import ConfigError, RLCoreError
from rlcore.models import load_model, read_config
from rlcore_backends.common.auto_dtype import config_counts, settle_dtype
from rlcore_backends.common.dtypes import DTYPES
from rlcore_backends.common.matched import match
from rlcore_backends.rollout.engine import Completion, TurnOptions, pad, run_turns, stop_token_ids
from rlcore_backends.rollout.hf.decode import Sampler, StopCriteria, StopStrings, decode
from rlcore_backends.common.logprobs import plain_head
from rlcore_backends.common.vision import cut_at_placeholders, load_processor, render_with_images, vision_inputs
from rlcore_backends.common.weights import copy_weights



class HFEngine:
    """The `Engine` over a transformers model: batches of left-padded prompts through `decode` (`lean`, for
    plain text models) or `generate`."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: list[int], device: torch.device,
                 max_rows: int, lean: bool = True) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.device, self.max_rows, self.lean = device, max_rows, lean

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 multimodal: list[dict[str, Tensor]] | None = None) -> list[Completion]:
        """One completion per prompt, `max_rows` prompts per `generate` call; `multimodal` holds each
        prompt's vision inputs (see `vision.vision_inputs`) for a vision-language model, whose completions
        end before any image placeholder token they sample."""
        out = [c for i in range(0, len(prompts), self.max_rows)
               for c in self._generate(prompts[i:i + self.max_rows], params,
                                       multimodal[i:i + self.max_rows] if multimodal else None)]
        return cut_at_placeholders(self.model.config, out) if multimodal else out

    def _generate(self, prompts: list[list[int]], params: SamplingParams,
                  multimodal: list[dict[str, Tensor]] | None = None) -> list[Completion]:
        rows = [torch.tensor(p, dtype=torch.long) for p in prompts]
        input_ids = pad(rows, self.tokenizer.pad_token_id, left=True).to(self.device)
        mask = pad([torch.ones_like(r) for r in rows], 0, left=True).to(self.device)
        stops = StopStrings(self.tokenizer, params.stop) if params.stop else None
        sampler = Sampler(params.temperature, params.top_p, self.eos_ids, params.min_new_tokens)
        head = plain_head(self.model) if self.lean and not multimodal else None
        if head is not None:
            return decode(self.model, head, input_ids, mask, sampler, params.max_new_tokens, self.eos_ids, stops)
        return self._generate_with_transformers(input_ids, mask, params, sampler, stops, multimodal)

    def _generate_with_transformers(self, input_ids: Tensor, mask: Tensor, params: SamplingParams,
                                    sampler: Sampler, stops: StopStrings | None,
                                    multimodal: list[dict[str, Tensor]] | None) -> list[Completion]:
        """transformers `generate` with `sampler` as its last logits processor (models `decode` cannot run)."""
        stop = StopCriteria(stops, input_ids.shape[1], len(input_ids)) if stops else None
        out = self.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=params.max_new_tokens, use_cache=True,
            do_sample=False, return_dict_in_generate=True, logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([stop] if stop else []),
            **vision_inputs(self.model, input_ids, multimodal))
        new = out.sequences[:, input_ids.shape[1]:]
        generated, width = new.cpu(), new.shape[1]
        rows = len(input_ids)
        logprobs = torch.stack(sampler.logprobs[:width], dim=1).cpu() if width else torch.zeros(rows, 0)
        is_eos = torch.isin(generated, torch.tensor(self.eos_ids, dtype=torch.long))
        never = width + 1
        eos_len = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, never)
        stop_len = stop.stopped_at.where(stop.stopped_at > 0, never) if stop else torch.full((rows,), never)
        completions = []
        for i in range(rows):
            n = min(int(eos_len[i]), int(stop_len[i]), width)
            reason = "eos" if eos_len[i] == n else "stop" if stop_len[i] == n else "length"
            completions.append(Completion(generated[i, :n].tolist(), logprobs[i, :n].tolist(), reason))
        return completions


class HFRollout:
    """n samples per prompt with transformers `generate`, returning the sampled tokens' logprobs."""

    @attrs.define
    class Options(TurnOptions):
        dtype: Literal["auto", "float32", "bfloat16", "bfloat16_matched"] = attrs.field(
            default="auto", validator=check_choice("auto", "float32", "bfloat16", "bfloat16_matched"))
        """Weights and compute dtype of the rollout model (bfloat16 is ~2x faster on AMX CPUs, less exact);
        bfloat16_matched: float32 weights, bfloat16 matmuls computing the bits the torch backend computes
        in its bfloat16_matched; auto: the backend's choice between the two (README: "Precision")."""
        max_rows_per_generate: int = attrs.field(default=512, validator=check_range(1))
        """Sequences decoded together (prompts times n); bounds the memory of the KV cache and logits."""
        decoder: Literal["lean", "generate"] = attrs.field(default="lean", validator=check_choice("lean", "generate"))
        """lean: rlcore's KV-cache loop (`hf_decode.decode`) for plain text models (1.5x on a 50M model with a
        151k vocabulary on a CPU), transformers `generate` for other models; generate: `generate` always."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.engine: HFEngine | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.processor: Any = None
        self.spec_path = ""
        self.device = torch.device("cpu")

    @hookimpl
    def settle_options(self, config: dict[str, Any], model_config: Any) -> dict[str, Any] | None:
        """`dtype: auto` made float32 or bfloat16_matched, as measured on this machine."""
        if self.options.dtype != "auto":
            return None
        return {"rollout": {"dtype": settle_dtype(config, "rollout", lambda: config_counts(model_config))}}

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Load the model on the hardware's device and replace its generation defaults by a neutral config
        (`dtype: auto` settled here when a run was not started by `rlcore run`, which settles it in config.yaml)."""
        self.device = ctx.hardware.device()
        if self.options.dtype == "auto":
            self.options = attrs.evolve(self.options, dtype=settle_dtype(
                ctx.config, "rollout", lambda: config_counts(read_config(str(ctx.model.path)))))
        matched = self.options.dtype == "bfloat16_matched"
        self.model = load_model(ctx.model, torch.float32 if matched else DTYPES[self.options.dtype], self.device)
        self.model.eval().requires_grad_(False)
        if matched:
            try:
                match(self.model)
            except ValueError as e:
                raise ConfigError(f"rollout.dtype=bfloat16_matched: {e}; use float32 here") from None
        self.tokenizer, self.spec_path = ctx.model.tokenizer, ctx.model.path
        eos_ids = stop_token_ids(self.model.generation_config.eos_token_id, self.tokenizer)
        self.model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=self.tokenizer.pad_token_id)
        self.engine = HFEngine(self.model, self.tokenizer, eos_ids, self.device, self.options.max_rows_per_generate,
                               lean=self.options.decoder == "lean")

    @hookimpl
    def sample(self, prompts: Sequence[Prompt], params: SamplingParams, tools: Sequence[Tool],
               interaction: Interaction | None) -> RolloutBatch:
        """n responses per prompt, each up to and including its first EOS (or stop string); `info` holds each
        sample's `finish_reason` (eos, stop or length) and the text keeps the stop string. With tools or an
        interaction, the multi-turn loop of `run_turns` (tool and interaction turns masked out of the loss)."""
        if any(p.images for p in prompts):
            return self._sample_images(prompts, params, tools, interaction)
        with self._rng(params.seed):
            return run_turns(self.engine, self.tokenizer, prompts, params, tools, self.options, interaction)

    def _sample_images(self, prompts: Sequence[Prompt], params: SamplingParams, tools: Sequence[Tool],
                       interaction: Interaction | None) -> RolloutBatch:
        """Prompts with images (vision-language models): the model's processor renders each prompt into ids
        (image patch tokens included) plus pixel values and image grids, which go to `generate` and into
        `batch.multimodal` (one dict per sample) for the trainer's forward passes; with tools, the same
        multi-turn tool loop as text prompts (`run_turns`), each turn generating with the sample's images."""
        if self.processor is None:
            self.processor = load_processor(str(self.spec_path), self.tokenizer)
        schemas = [t.schema() for t in tools]
        rendered = [render_with_images(self.processor, p, p.tools or schemas) for p in prompts]
        with self._rng(params.seed):
            return run_turns(self.engine, self.tokenizer, prompts, params, tools, self.options, interaction,
                             rendered=[ids for ids, _ in rendered], multimodal=[mm for _, mm in rendered])

    @hookimpl
    def sync_weights(self, weights: Weights) -> dict[str, float]:
        """Copy the trainer's full weights into the rollout model (cast to its dtype and device)."""
        if weights.adapter:
            raise RLCoreError("the hf rollout loads full weights only; adapter-only weights are not supported: "
                              "set backend.sync=merged, or use the vllm rollout, which loads adapters")
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
