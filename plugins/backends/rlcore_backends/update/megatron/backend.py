"""Megatron-core update backend: tensor- and pipeline-parallel GPTModel built from a Hugging Face model.

`setup` spawns tp x pp worker processes (one per device), each of which joins a torch.distributed group
on the hardware plugin's collective backend, calls `parallel_state.initialize_model_parallel(tp, pp)`,
builds its slice of the GPTModel and loads the Hugging Face weights into it (`convert`). The
hooks send each call to every worker (`pool`); the loss runs on tensor-parallel logits
(`loss`), and `policy_weights` gathers the shards back into Hugging Face names. Megatron runs on
CUDA GPUs over NCCL; the tests run it on CPU over gloo with a few test-only shims.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
from torch import Tensor

from rlcore import PolicyLoss, RolloutBatch, UpdatePlan, Weights, hookimpl
from rlcore.config import check_range
from rlcore.context import RunContext
from rlcore.errors import ConfigError, RLCoreError
from rlcore_backends.common.train_options import OptimizerOptions, with_run_length
from rlcore_backends.update.megatron import checkpoint as ckpt
from rlcore_backends.update.megatron.convert import Layout, hf_from_shards
from rlcore_backends.update.megatron.model import check_installed
from rlcore_backends.update.megatron.pool import WorkerPool, free_address
from rlcore_backends.update.megatron.worker import Worker, WorkerSpec


class MegatronBackend:
    """Trains the policy with Megatron-core: tensor and pipeline parallelism over tp x pp worker processes."""

    @attrs.define
    class Options(OptimizerOptions):
        tp: int = attrs.field(default=1, validator=check_range(1))
        """Tensor-parallel size: each layer's weights and the vocabulary split over this many devices."""
        pp: int = attrs.field(default=1, validator=check_range(1))
        """Pipeline-parallel size: the layers split into this many stages (1F1B schedule over micro-batches)."""
        micro_batch_size: int = attrs.field(default=0, validator=check_range(0))
        """At most this many samples per micro-batch (0: only the token budget limits it)."""
        sequence_parallel: bool = False
        """Megatron sequence parallelism (norms and dropout split along the sequence over the tp group);
        needs tp > 1 and transformer_engine."""
        recompute: bool = False
        """Activation checkpointing: recompute every transformer layer in the backward pass."""
        transformer_engine: bool = False
        """Build layers from NVIDIA Transformer Engine (fused attention and norms; CUDA with
        `transformer-engine` installed) instead of Megatron's local PyTorch layers."""
        worker_timeout: float = attrs.field(default=1800.0, validator=check_range(1.0))
        """Seconds a worker may take to answer one call (start-up, logprobs, update) before the run stops."""

    worker_init: Callable[[], None] | None = None
    """A picklable function each worker process calls first (before importing Megatron's model code);
    tests use it to run Megatron on the CPU."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.pool: WorkerPool | None = None
        self.layout: Layout | None = None
        self.model_dir: Path | None = None
        self.tokenizer: Any = None
        self.steps = 0

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Start tp x pp workers on the hardware plugin's devices; each loads its shard of the policy."""
        check_installed()
        opts = self.options = with_run_length(self.options, ctx.config)
        if opts.sequence_parallel and (opts.tp < 2 or not opts.transformer_engine):
            raise ConfigError("backend.sequence_parallel needs backend.tp > 1 and backend.transformer_engine=true "
                              "(Megatron's local norm layers do not split the sequence)")
        model_dir = ckpt.model_dir(ctx.model.path)
        self.layout = Layout.from_hf_config(ckpt.hf_config(model_dir), opts.tp, opts.pp)
        world = opts.tp * opts.pp
        if ctx.hardware.device().type == "cpu" and self.worker_init is None:
            raise ConfigError("backend megatron needs GPUs (--hardware cuda): Megatron-core's layers, schedules and "
                              "random-number tracker are CUDA-only; on a CPU use --backend torch or fsdp")
        if ctx.hardware.device().type != "cpu" and ctx.hardware.device_count() < world:
            raise ConfigError(f"backend megatron: tp x pp = {world} needs {world} devices, "
                              f"hardware {ctx.hardware.name} has {ctx.hardware.device_count()}")
        devices = tuple(str(ctx.hardware.device(local_rank=rank)) for rank in range(world))
        self.model_dir, self.tokenizer = model_dir, ctx.model.tokenizer
        worker_spec = WorkerSpec(model_dir=str(model_dir), options=opts, devices=devices,
                                 collective=ctx.hardware.collective_backend(), address=free_address(), seed=ctx.seed)
        self.pool = WorkerPool(partial(Worker, spec=worker_spec), world, opts.worker_timeout, self.worker_init)

    @hookimpl
    def teardown(self) -> None:
        """Stop the worker processes."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    @hookimpl
    def logprobs(self, batch: RolloutBatch, reference: bool) -> Tensor:
        """Logprobs of logits / batch.temperature under the policy (or the frozen starting policy)."""
        _text_only(batch)
        return self._reported(self.pool.run(Worker.logprobs, batch.to("cpu"), reference)).to(batch.response_ids.device)

    @hookimpl
    def update(self, batch: RolloutBatch, loss: PolicyLoss, plan: UpdatePlan) -> dict[str, float]:
        """Epochs x mini-batches of optimizer steps on every rank; metrics as the torch backend reports them."""
        _text_only(batch)
        start = time.perf_counter()
        metrics = self._reported(self.pool.run(Worker.update, batch.to("cpu"), loss, plan))
        size = math.ceil(len(batch) / plan.mini_batches)
        self.steps += plan.epochs * math.ceil(len(batch) / size)
        seconds = time.perf_counter() - start
        tokens = plan.epochs * int(batch.prompt_mask.sum() + batch.attention_mask.sum())
        return {**metrics, "update/seconds": seconds, "update/tokens_per_s": tokens / seconds}

    @hookimpl
    def policy_weights(self) -> Weights:
        """Every rank's shard gathered into Hugging Face names (when the rollout asks for the tensors)."""
        return Weights(named_tensors=self._hf_tensors, version=self.steps)

    @hookimpl
    def save_state(self, directory: Path) -> None:
        """A Megatron checkpoint (see `checkpoint`): per-rank weights, optimizer and scheduler."""
        directory = Path(directory)
        self.pool.run(Worker.save, directory)
        ckpt.write_hf_files(self.model_dir, directory / ckpt.HF_DIR, self.tokenizer)
        ckpt.write_meta(directory, self.layout, self.steps)

    @hookimpl
    def load_state(self, directory: Path) -> None:
        """Restore a checkpoint written by `save_state` with the same tp and pp."""
        layout, steps = ckpt.read_layout(Path(directory))
        if (layout.tp, layout.pp) != (self.options.tp, self.options.pp):
            raise ConfigError(f"the checkpoint {directory} was saved with tp={layout.tp}, pp={layout.pp}; resume with "
                              f"--set backend.tp={layout.tp} --set backend.pp={layout.pp}")
        self.pool.run(Worker.load, Path(directory))
        self.steps = steps

    @hookimpl
    def export_model(self, checkpoint: Path, out: Path) -> Path:
        """The policy of a `save_state` checkpoint as a transformers model directory."""
        return ckpt.native_to_hf(Path(checkpoint), Path(out))

    @hookimpl
    def convert_checkpoint(self, source: Path, out: Path, to: str) -> Path:
        """`to="native"`: a Hugging Face directory (or hub id) -> a Megatron checkpoint at this backend's
        tp x pp; `to="hf"`: a Megatron checkpoint -> a transformers model directory."""
        if to == "native":
            return ckpt.hf_to_native(ckpt.model_dir(str(source)), Path(out), self.options.tp, self.options.pp)
        if to == "hf":
            return ckpt.native_to_hf(Path(source), Path(out))
        raise ConfigError(f"convert: to={to!r} is not supported by backend megatron; use 'native' or 'hf'")

    def _hf_tensors(self) -> Iterator[tuple[str, Tensor]]:
        shards = dict(self.pool.run(Worker.shard))
        return iter(hf_from_shards(self.layout, shards).items())

    @staticmethod
    def _reported(answers: list[Any]) -> Any:
        """The answer of the reporting rank (last pipeline stage, tensor rank 0); the others return None."""
        return next(a for a in answers if a is not None)


def _text_only(batch: RolloutBatch) -> None:
    """Megatron's GPT model has no vision tower: refuse a batch with images rather than train on text alone."""
    if batch.multimodal and any(batch.multimodal):
        raise RLCoreError("the megatron backend does not take images yet (vision-language models): use the "
                          "torch or fsdp backend for tasks with images")
