"""One rank of the fsdp backend: its FSDP2 shard of the policy, sharded AdamW, and collective steps.

Every method is called on every rank at once (see `common.worker_group`), each with its own shard of the
batch. Ranks stay in lockstep: each runs as many forward/backward passes as the busiest rank (idle
passes have zero weight), because FSDP all-gathers parameters in every forward and reduce-scatters
gradients in every backward.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers.utils import logging as hf_logging

from rlcore import LossNorm, ModelSpec, PolicyLoss, RolloutBatch
from rlcore.metrics import combine, mean_over_steps, reduction
from rlcore.models import load_model
from rlcore_backends.common import micro_batches
from rlcore_backends.common.logprobs import response_logits
from rlcore_backends.common.policy_pass import logprobs_pass, loss_pass, non_finite_error
from rlcore_backends.common.dtypes import DTYPES
from rlcore_backends.common.train_options import apply_lr, autocast, build_optimizer, enable_gradient_checkpointing

DCP_DIR = "dcp"
"""The sharded model and optimizer state inside a checkpoint (torch.distributed.checkpoint format)."""
TRAINER_FILE = "trainer.pt"
"""Scheduler state and step count inside a checkpoint."""
ADAPTER_DIR = "adapter"
"""LoRA on fsdp: the adapters inside a checkpoint, in peft's `save_pretrained` format (as the lora backend's)."""


@attrs.frozen
class LoRASpec:
    """peft LoRA adapters to train on the frozen base (the lora backend with `base: fsdp`)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]


@attrs.frozen
class RankSpec:
    """What one rank needs to start: picklable, sent to a spawned process."""

    model_path: str
    options: Any
    """The fsdp backend's options (TrainOptions plus param_dtype, reduce_dtype, reshard_after_forward, timeout_s)."""
    rank: int
    world_size: int
    device: torch.device
    collective: str
    """torch.distributed backend from the hardware plugin: gloo, nccl or hccl."""
    seed: int
    store_port: int | None = None
    """Port of the driver's TCPStore on 127.0.0.1 (spawned ranks); None: torchrun's env:// rendezvous."""
    threads: int = 0
    """CPU threads for this rank (0: leave torch's default)."""
    lora: LoRASpec | None = None
    """Train only LoRA adapters (peft-wrapped before sharding); None: every parameter."""


def shard_model(model: torch.nn.Module, mesh: Any, options: Any) -> torch.nn.Module:
    """FSDP2 over each decoder layer (transformers' `_no_split_modules`), then the root; gradients are
    summed over ranks, not averaged, since each rank's loss is already its share of the global loss."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[options.param_dtype], reduce_dtype=DTYPES[options.reduce_dtype])
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layer_types:
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


class FSDPWorker:
    """The policy of one rank, FSDP2-sharded over every rank's device, with its shard of AdamW."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec, self.options = spec, spec.options
        self.rank, self.world_size, self.device = spec.rank, spec.world_size, spec.device
        if spec.threads:
            torch.set_num_threads(spec.threads)
        if self.device.type != "cpu":
            torch.get_device_module(self.device).set_device(self.device)
        timeout = timedelta(seconds=self.options.timeout_s)
        if spec.store_port is None:
            dist.init_process_group(spec.collective, timeout=timeout)
        else:
            store = dist.TCPStore("127.0.0.1", spec.store_port, is_master=False, timeout=timeout)
            dist.init_process_group(spec.collective, store=store, rank=spec.rank, world_size=spec.world_size,
                                    timeout=timeout)
        torch.manual_seed(spec.seed)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        model = self._load()
        if self.options.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.lora = spec.lora
        if self.lora is not None:  # peft first: fully_shard then shards base weights and adapters alike
            from rlcore_backends.common.adapters import add_lora, lora_scalings

            model = add_lora(model, self.lora.rank, self.lora.alpha, self.lora.dropout, self.lora.target_modules)
            self.scalings = lora_scalings(model)
        self.model = shard_model(model, self.mesh, self.options)
        # AdamW over the parameters that require grad: the adapters alone under LoRA.
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), self.options)
        self.reference: Any = None
        self.steps = 0

    # ---- collective calls ------------------------------------------------------------------------

    def update(self, minis: list[RolloutBatch], epochs: int, loss: PolicyLoss,
               max_len: int) -> tuple[dict[str, float], int]:
        """`epochs` passes over this rank's shards of the mini-batches, one optimizer step each. Returns
        the metrics (summed over ranks, averaged over steps) and the optimizer steps taken so far."""
        self.model.train()
        sums: dict[str, float] = {}
        for _ in range(epochs):
            for mini in minis:
                combine(sums, self._step(mini, loss, max_len, mismatch=epochs * len(minis) == 1))
        return mean_over_steps(sums, epochs * len(minis)), self.steps

    def logprobs(self, shard: RolloutBatch, reference: bool) -> list[Tensor] | None:
        """No-grad logprobs of this rank's shard; rank 0 gets every rank's, in rank order."""
        order, passes = micro_batches.by_length(shard, self.options.micro_batch_tokens,
                                                micro_batches.pass_cost_tokens(self.device))
        rows = shard.select(order)
        out = torch.zeros(shard.response_ids.shape)
        with self._scoring_model(reference) as model:
            for i in range(self._max_over_ranks(len(passes))):
                mb = passes[min(i, len(passes) - 1)]
                part = logprobs_pass(model, micro_batches.take(rows, mb).to(self.device), self._autocast())
                if i < len(passes):
                    out[order[mb.start:mb.stop], :mb.response_width] = part.cpu()
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(out, gathered, dst=0)
        return gathered

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The whole policy's state dict on rank 0's CPU (Hugging Face names); None on the other ranks."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.rank == 0 else None

    def lora_state(self, merged: bool) -> dict[str, Tensor] | None:
        """LoRA: on rank 0, the full weights with the adapters merged (base model names), or the adapters
        alone (peft names); None on the other ranks. Gathered from the shards, computed on the CPU."""
        from rlcore_backends.common.adapters import adapter_state_from_full, merge_full_state

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        return merge_full_state(state, self.scalings) if merged else adapter_state_from_full(self.model, state)

    def adapter_config(self) -> dict[str, Any]:
        """LoRA: the adapter's peft config as JSON data."""
        from rlcore_backends.common.adapters import adapter_config

        return adapter_config(self.model)

    def save(self, directory: Path) -> None:
        """Sharded model and optimizer state through torch.distributed.checkpoint (every rank writes its
        shard; under LoRA the adapters only), plus the scheduler and step count from rank 0, and under
        LoRA the adapters in peft format (`adapter/`, for `rlcore export` and peft users)."""
        state = self._sharded_state()
        dcp.save(state, checkpoint_id=str(Path(directory) / DCP_DIR))
        if self.lora is not None:
            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank == 0:
                self.model.save_pretrained(Path(directory) / ADAPTER_DIR, state_dict=full)
        if self.rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict(), "steps": self.steps}, Path(directory) / TRAINER_FILE)
        dist.barrier()

    def load(self, directory: Path) -> int:
        """Restore what `save` wrote (with any world size); returns the step count."""
        trainer = torch.load(Path(directory) / TRAINER_FILE, weights_only=True)
        if trainer["steps"] == 0:
            self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), self.options)
        self.steps = trainer["steps"]
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR))
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=self.lora is None))
        if "optim" in state:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        apply_lr(self.optimizer, self.scheduler, self.options.lr)
        return self.steps

    def close(self) -> None:
        """Leave the process group and free it before this process exits. Freeing joins gloo's worker
        threads; `destroy_process_group` alone does not, since FSDP's device mesh keeps the group alive
        (and DTensor's caches keep the mesh). A worker thread left running may still be releasing the
        last collective's tensors, which needs the GIL: during interpreter finalization that kills the
        thread inside a noexcept destructor and the process aborts ("terminate called without an active
        exception") after a run that succeeded."""
        dist.destroy_process_group()
        # the mesh's own references to its groups (torch >= 2.9; no public API drops them)
        getattr(self.mesh, "_pg_registry", {}).clear()
        self.model = self.reference = self.optimizer = self.scheduler = self.mesh = None
        gc.collect()  # FSDP's modules and hooks form cycles that hold the group too

    # ---- one optimizer step -----------------------------------------------------------------------

    def _step(self, mini: RolloutBatch, loss: PolicyLoss, max_len: int, mismatch: bool) -> dict[str, float]:
        """Forward/backward every micro-batch of this rank's shard with the mini-batch's global counts,
        then clip the global gradient norm and step (`mismatch`: as the torch backend's)."""
        norm = LossNorm.of(mini.response_mask, max_len, reduce=self._sum_over_ranks)
        order, passes = micro_batches.by_length(mini, self.options.micro_batch_tokens,
                                                micro_batches.pass_cost_tokens(self.device))
        rows = mini.select(order)  # the loss sums over micro-batches, so their order does not matter
        metrics: dict[str, float] = {}
        for i in range(self._max_over_ranks(len(passes))):
            if i < len(passes):
                part = micro_batches.take(rows, passes[i]).to(self.device)
                value, part_metrics = loss_pass(self.model, part, loss, norm, self._autocast(), mismatch=mismatch)
                value.backward()
                combine(metrics, part_metrics)
            else:
                self._idle_pass(micro_batches.take(rows, passes[0]).to(self.device))
        metrics = self._combine_over_ranks(metrics)
        max_norm = self.options.max_grad_norm or math.inf
        total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        lr = self.optimizer.param_groups[0]["lr"]
        if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise non_finite_error(metrics["loss"], grad_norm, self.steps + 1, lr)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {**metrics, "grad_norm": grad_norm, "lr": lr}

    def _idle_pass(self, part: RolloutBatch) -> None:
        """A zero-weight forward and backward, so this rank joins the collectives of a busier rank's pass."""
        with self._autocast():
            logits = response_logits(self.model, *part.sequences(), part.response_ids.shape[1], part.temperature,
                                     part.multimodal)
        (logits.mean() * 0.0).backward()

    # ---- helpers ----------------------------------------------------------------------------------

    def _load(self) -> torch.nn.Module:
        """The full float32 policy on the CPU; `fully_shard` then moves each rank's shard to its device."""
        hf_logging.disable_progress_bar()  # one bar per rank would interleave with the run's output
        return load_model(ModelSpec(path=self.spec.model_path), torch.float32, "cpu")

    @contextlib.contextmanager
    def _scoring_model(self, reference: bool) -> Iterator[torch.nn.Module]:
        """The policy in eval mode, or the frozen starting policy: under LoRA the policy with its adapters
        disabled, else a second sharded copy loaded on first use."""
        if not reference:
            yield self.model.eval()
        elif self.lora is not None:
            with self.model.disable_adapter():
                yield self.model.eval()
        else:
            if self.reference is None:
                self.reference = shard_model(self._load().requires_grad_(False), self.mesh, self.options).eval()
            yield self.reference

    def _sharded_state(self) -> dict[str, Any]:
        """The model's (and, once it has taken a step, the optimizer's) sharded state dicts; under LoRA the
        model's adapters only (the base is the run's model). An optimizer without steps is left out: asking
        DCP for its state would initialise it with a fake step."""
        model = get_model_state_dict(self.model)
        if self.lora is not None:
            model = {name: t for name, t in model.items() if ".lora_" in name}
        state: dict[str, Any] = {"model": model}
        if self.steps:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def _combine_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every rank's metrics folded as `rlcore.metrics.reduction` says (sums, maxima, minima)."""
        sums = sorted(n for n in metrics if reduction(n) == "sum")
        extremes = sorted(n for n in metrics if reduction(n) != "sum")
        out = dict(zip(sums, self._sum_over_ranks([metrics[n] for n in sums])))
        if extremes:  # minima as maxima of the negatives, in one collective
            sign = [-1.0 if reduction(n) == "min" else 1.0 for n in extremes]
            t = torch.tensor([s * metrics[n] for s, n in zip(sign, extremes)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out.update({n: s * v for s, n, v in zip(sign, extremes, t.tolist())})
        return out

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _max_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _autocast(self) -> torch.autocast:
        return autocast(self.device, self.options.dtype)


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) when this process was launched by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])

