"""FSDP2 update backend: the policy sharded over `world_size` processes with torch.distributed.

The loop stays in this (driver) process. `setup` spawns one worker process per rank, or, when this
process was launched by torchrun, becomes rank 0 of that group while the other ranks serve it. Each
`update` / `logprobs` call sends every rank its contiguous shard of the batch (and the algorithm's
loss, which pickles); the ranks sum their token and sequence counts so each normalises by the
mini-batch's global `LossNorm`, and gradients are summed (not averaged) over ranks, so a step equals
the single-process torch backend's step on the same batch up to float rounding.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor

from rlcore import PolicyLoss, RolloutBatch, UpdatePlan, Weights, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.context import RunContext
from rlcore_backends.common.export import load_cpu_model, write_model_dir
from rlcore_backends.update.fsdp.worker import DCP_DIR, FSDPWorker, LoRASpec, RankSpec, torchrun_rank
from rlcore_backends.common.micro_batches import rank_shards
from rlcore_backends.common.train_options import TrainOptions, with_run_length
from rlcore_backends.common.worker_group import SpawnedGroup, TorchrunGroup, serve_ranks


class FSDPBackend:
    """Trains the policy FSDP2-sharded over several processes (gloo on CPU, nccl on CUDA, hccl on NPU)."""

    @attrs.define
    class Options(TrainOptions):
        world_size: int = attrs.field(default=2, validator=check_range(1))
        """Worker processes to spawn, one per device (under torchrun, its WORLD_SIZE is used instead)."""
        param_dtype: Literal["float32", "bfloat16"] = attrs.field(
            default="float32", validator=check_choice("float32", "bfloat16"))
        """FSDP mixed precision: dtype parameters are all-gathered and computed in (sharded master weights
        and the optimizer stay float32)."""
        reduce_dtype: Literal["float32", "bfloat16"] = attrs.field(
            default="float32", validator=check_choice("float32", "bfloat16"))
        """FSDP mixed precision: dtype gradients are reduce-scattered in."""
        reshard_after_forward: bool = True
        """Free gathered parameters after each layer's forward (ZeRO-3); False keeps them until the backward
        (ZeRO-2 like: more memory, one all-gather less per micro-batch)."""
        timeout_s: float = attrs.field(default=1800.0, validator=check_range(1.0))
        """Seconds to wait for a worker's reply (and for a collective) before stopping the workers with an
        error; a worker that dies is reported at once."""

    def __init__(self, options: Options, lora: LoRASpec | None = None) -> None:
        self.options = options
        self.lora = lora
        """LoRA adapters to train instead of every parameter (the lora backend with `base: fsdp` sets it)."""
        self.group: Any = None
        self.store: Any = None
        """The spawned ranks' rendezvous server (a TCPStore on 127.0.0.1), alive as long as they are."""
        self.steps = 0
        self._weights: tuple[Any, dict[str, Tensor]] | None = None
        self._adapter_config: dict[str, Any] | None = None

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Start the ranks (each loads and shards the policy, builds its AdamW shard) and wait until all are ready."""
        opts = self.options = with_run_length(self.options, ctx.config)
        launched = torchrun_rank()
        if launched is not None:
            rank, local_rank, world_size = launched
            worker = FSDPWorker(self._rank_spec(ctx, rank, local_rank, world_size))
            if rank != 0:
                serve_ranks(worker)
                raise SystemExit(0)  # this rank served rank 0's run (the loop runs only there) and closed
            self.group = TorchrunGroup(worker)
            return
        threads = max(1, torch.get_num_threads() // opts.world_size)
        self.store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        specs = [attrs.evolve(self._rank_spec(ctx, rank, rank, opts.world_size), store_port=self.store.port,
                              threads=threads) for rank in range(opts.world_size)]
        self.group = SpawnedGroup(FSDPWorker, specs, opts.timeout_s, name="fsdp")

    @hookimpl
    def logprobs(self, batch: RolloutBatch, reference: bool) -> Tensor:
        """No-grad logprobs, each rank scoring its shard; 0 outside `attention_mask`, on the batch's device."""
        shards = rank_shards(batch.to("cpu"), self.group.world_size)
        parts = self.group.call("logprobs", [{"shard": shard, "reference": reference} for shard, _ in shards])
        out = torch.cat([part[:rows] for part, (_, rows) in zip(parts, shards)])
        return out.masked_fill(batch.attention_mask.cpu() == 0, 0.0).to(batch.response_ids.device)

    @hookimpl
    def update(self, batch: RolloutBatch, loss: PolicyLoss, plan: UpdatePlan) -> dict[str, float]:
        """One optimizer step per mini-batch per epoch, each rank training on its shard of every mini-batch;
        metrics as the torch backend's (means over steps; tokens/s over the call)."""
        start = time.perf_counter()
        batch = batch.to("cpu")
        minis = batch.split(math.ceil(len(batch) / plan.mini_batches))
        shards = [rank_shards(mini, self.group.world_size) for mini in minis]
        max_len = plan.max_response_length or batch.response_ids.shape[1]
        metrics, self.steps = self.group.call("update", [
            {"minis": [mini[rank][0] for mini in shards], "epochs": plan.epochs, "loss": loss, "max_len": max_len}
            for rank in range(self.group.world_size)])
        tokens = plan.epochs * int(batch.prompt_mask.sum() + batch.attention_mask.sum())
        seconds = time.perf_counter() - start
        return {**metrics, "update/seconds": seconds, "update/tokens_per_s": tokens / seconds}

    @hookimpl
    def policy_weights(self) -> Weights:
        """The full state dict, gathered from the shards onto this process's CPU once per version (under
        LoRA: merged or adapters, as the lora backend's `sync` option says)."""
        if self.lora is not None:
            return self.lora_weights(merged=self.options.sync == "merged")
        if self._weights is None or self._weights[0] != self.steps:
            self._weights = (self.steps, self.group.call("full_state_dict", self._no_args()))
        state = self._weights[1]
        return Weights(named_tensors=lambda: iter(state.items()), version=self.steps)

    def lora_weights(self, merged: bool) -> Weights:
        """LoRA: full weights with the adapters merged, or the adapters alone with their peft config."""
        key = (self.steps, merged)
        if self._weights is None or self._weights[0] != key:
            self._weights = (key, self.group.call("lora_state", [{"merged": merged}] * self.group.world_size))
        state = self._weights[1]
        if merged:
            return Weights(named_tensors=lambda: iter(state.items()), version=self.steps)
        if self._adapter_config is None:
            self._adapter_config = self.group.call("adapter_config", self._no_args())
        return Weights(named_tensors=lambda: iter(state.items()), version=self.steps, adapter=True,
                       adapter_config=self._adapter_config)

    @hookimpl
    def save_state(self, directory: Path) -> None:
        """`dcp/`: sharded model and optimizer state (torch.distributed.checkpoint; loadable with another
        world size), `trainer.pt`: scheduler and step count."""
        self.group.call("save", [{"directory": Path(directory)}] * self.group.world_size)

    @hookimpl
    def load_state(self, directory: Path) -> None:
        """Restore what `save_state` wrote into every rank, so training resumes bit-identically."""
        self.steps = self.group.call("load", [{"directory": Path(directory)}] * self.group.world_size)
        self._weights = None

    @hookimpl
    def export_model(self, checkpoint: Path, out: Path, ctx: RunContext) -> Path:
        """Load the sharded checkpoint into the base model in this process (no process group needed) and
        save it with the run's tokenizer."""
        model = load_cpu_model(ctx.model.path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process is the intent
            dcp.load({"model": model.state_dict()}, checkpoint_id=str(Path(checkpoint) / DCP_DIR), no_dist=True)
        return write_model_dir(model, ctx.model.tokenizer, Path(out))

    @hookimpl
    def teardown(self) -> None:
        """Close the ranks (and the process group)."""
        if self.group is not None:
            self.group.close()
            self.group = self.store = None

    def _rank_spec(self, ctx: RunContext, rank: int, local_rank: int, world_size: int) -> RankSpec:
        return RankSpec(model_path=ctx.model.path, options=self.options, rank=rank, world_size=world_size,
                        device=ctx.hardware.device(local_rank), collective=ctx.hardware.collective_backend(),
                        seed=ctx.seed, lora=self.lora)

    def _no_args(self) -> list[dict[str, Any]]:
        return [{} for _ in range(self.group.world_size)]
