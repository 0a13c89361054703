"""One Megatron rank: its process group, its slice of the policy, its optimizer, and the commands it serves.

The backend starts tp x pp of these (see `pool`); each command (`logprobs`, `update`, `shard`,
`save`, `load`) runs on every rank at once, since forward and backward passes are collective. Batches run
through Megatron's pipeline schedule (`get_forward_backward_func`: 1F1B across pipeline stages, plain
gradient accumulation without), gradients are finalised by `finalize_model_grads` (tied-embedding and
sequence-parallel norm all-reduces), and the step is AdamW on this rank's float32 parameters, clipped by
the global gradient norm over the model-parallel group.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import Tensor

from rlcore import LossInputs, LossNorm, PolicyLoss, RolloutBatch, UpdatePlan
from rlcore.errors import TrainingError
from rlcore.metrics import combine, mean_over_steps
from rlcore_backends.common import micro_batches
from rlcore_backends.common.policy_pass import on_policy_mismatch
from rlcore_backends.update.megatron.checkpoint import (SafetensorsReader, hf_config, load_model, rank_state_file,
                                                        save_model)
from rlcore_backends.update.megatron.convert import Layout, shard_from_hf
from rlcore_backends.update.megatron.inputs import MicroInputs, pack
from rlcore_backends.update.megatron.loss import vocab_parallel_logprobs
from rlcore_backends.update.megatron.model import (build_gpt, freeze_padding_embedding, load_shard, shard_of,
                                            transformer_config)
from rlcore_backends.common.train_options import ScheduledLR, apply_lr, schedule_of


@attrs.frozen
class WorkerSpec:
    """What every rank is started with (pickled once, at spawn)."""

    model_dir: str
    options: Any
    """The backend's `MegatronBackend.Options`."""
    devices: tuple[str, ...]
    """The device of each global rank."""
    collective: str
    """torch.distributed backend: gloo, nccl or hccl."""
    address: str
    """`tcp://host:port` for the process-group rendezvous."""
    seed: int


class Worker:
    """The state of one rank; its public methods are the commands the driver sends."""

    def __init__(self, rank: int, spec: WorkerSpec) -> None:
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.spec, self.opts = spec, spec.options
        self.device = torch.device(spec.devices[rank])
        if self.device.type == "cuda":
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron's tp overlap needs ordered kernels
        if self.device.type != "cpu":
            torch.accelerator.set_device_index(self.device.index)
        dist.init_process_group(spec.collective, init_method=spec.address, rank=rank, world_size=len(spec.devices))
        parallel_state.initialize_model_parallel(self.opts.tp, self.opts.pp)
        torch.manual_seed(spec.seed)
        if self.device.type == "cuda":
            tensor_parallel.model_parallel_cuda_manual_seed(spec.seed)
        self.hf_config = hf_config(Path(spec.model_dir))
        self.layout = Layout.from_hf_config(self.hf_config, self.opts.tp, self.opts.pp)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.model_parallel_group = parallel_state.get_model_parallel_group()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.reports = self.last_stage and self.tp_rank == 0
        """The rank whose answers (logprobs, metrics) the driver takes."""
        self.vocab_start = self.tp_rank * self.layout.vocab_shard
        self.vocab_real = max(0, min(self.layout.vocab_shard, self.layout.vocab - self.vocab_start))
        self.model = self._build()
        freeze_padding_embedding(self.model, getattr(self.hf_config, "pad_token_id", None))
        self.ddp = DistributedDataParallel(self.model.config, DistributedDataParallelConfig(), self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.opts.lr, betas=tuple(self.opts.betas),
                                           eps=self.opts.eps, weight_decay=self.opts.weight_decay)
        self.scheduler = ScheduledLR(self.optimizer, schedule_of(self.opts))
        self.reference: Any = None
        self.steps = 0

    # ---- commands --------------------------------------------------------------------------------

    def logprobs(self, batch: RolloutBatch, reference: bool) -> Tensor | None:
        """No-grad logprobs [B, R] of logits / temperature (0 outside `attention_mask`), on the reporting rank."""
        model = self._reference() if reference else self.ddp
        model.eval()
        plan, parts = self._micro_batches(batch)
        with torch.no_grad():
            outputs = self._schedule(model, parts, self._logprobs_of, forward_only=True)
        if not self.reports:
            return None
        out = torch.zeros(batch.response_ids.shape)
        for mb, output in zip(plan, outputs, strict=True):
            out[mb.start:mb.stop, :mb.response_width] = output["logprobs"].float().cpu()
        return out.masked_fill(batch.attention_mask.cpu() == 0, 0.0)

    def update(self, batch: RolloutBatch, loss: PolicyLoss, plan: UpdatePlan) -> dict[str, float] | None:
        """`plan.epochs` x `plan.mini_batches` optimizer steps; mean metrics on the reporting rank."""
        self.ddp.train()
        max_len = plan.max_response_length or batch.response_ids.shape[1]
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(plan.epochs):
            for mini in batch.split(math.ceil(len(batch) / plan.mini_batches)):
                combine(sums, self._step(mini, loss, LossNorm.of(mini.response_mask, max_len),
                                         mismatch=plan.epochs * plan.mini_batches == 1))
                steps += 1
        return mean_over_steps(sums, steps) if self.reports else None

    def shard(self) -> tuple[tuple[int, int], dict[str, Tensor]]:
        """((tp_rank, pp_rank), this rank's policy weights under canonical names, on the CPU)."""
        return (self.tp_rank, self.pp_rank), shard_of(self.model, self.opts.transformer_engine)

    def save(self, directory: Path) -> None:
        """The model through megatron-core's `dist_checkpointing` in Megatron-LM's layout (all ranks together,
        see `checkpoint`), and this rank's optimizer, scheduler and step count beside it."""
        save_model(self.model, directory, self.layout, self.hf_config, self.steps)
        path = rank_state_file(directory, self.tp_rank, self.pp_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "steps": self.steps}, path)

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (same tp x pp for the optimizer state), so training resumes exactly."""
        load_model(self.model, directory)
        state = torch.load(rank_state_file(directory, self.tp_rank, self.pp_rank), map_location=self.device,
                           weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        apply_lr(self.optimizer, self.scheduler, self.opts.lr)
        self.steps = state["steps"]

    def close(self) -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()

    # ---- internals -------------------------------------------------------------------------------

    def _build(self) -> Any:
        """This rank's GPTModel with the Hugging Face weights loaded."""
        opts = self.opts
        config = transformer_config(self.hf_config, self.layout, sequence_parallel=opts.sequence_parallel,
                                    recompute=opts.recompute, bf16_autocast=opts.dtype == "bfloat16",
                                    on_cpu=self.device.type == "cpu")
        model = build_gpt(self.hf_config, self.layout, config, opts.transformer_engine)
        read = SafetensorsReader(Path(self.spec.model_dir))
        load_shard(model, shard_from_hf(self.layout, read, self.tp_rank, self.pp_rank), opts.transformer_engine)
        return model

    def _reference(self) -> Any:
        """The frozen starting policy, built on first use."""
        if self.reference is None:
            self.reference = self._build().requires_grad_(False)
        return self.reference

    def _micro_batches(self, batch: RolloutBatch) -> tuple[list[micro_batches.MicroBatch], list[MicroInputs]]:
        """Token-budget micro-batches (at most `micro_batch_size` rows each), packed for GPTModel."""
        size = self.opts.micro_batch_size or len(batch)
        plan = [attrs.evolve(mb, start=s, stop=min(s + size, mb.stop))
                for mb in micro_batches.plan(batch, self.opts.micro_batch_tokens)
                for s in range(mb.start, mb.stop, size)]
        multiple = self.opts.tp if self.opts.sequence_parallel else 1
        return plan, [pack(micro_batches.take(batch, mb).to(self.device), multiple) for mb in plan]

    def _schedule(self, model: Any, parts: list[MicroInputs], loss_of: Callable[..., Any],
                  forward_only: bool) -> list[dict[str, Tensor]]:
        """Run Megatron's forward(-backward) schedule over the micro-batches; `loss_of(inputs, logits)` runs
        on the last pipeline stage and returns (loss, token count, report)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data: Iterator[MicroInputs], module: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
            inputs = next(data)
            return module(inputs.tokens, inputs.position_ids, inputs.attention_mask), partial(loss_of, inputs)

        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(parts), model=[model], num_microbatches=len(parts),
            seq_length=max(p.tokens.shape[1] for p in parts), micro_batch_size=max(len(p.part) for p in parts),
            forward_only=forward_only)

    def _token_logprobs(self, inputs: MicroInputs, logits: Tensor, entropy_grad: bool) -> tuple[Tensor, Tensor]:
        """Logprobs and entropy [b, R] of the response tokens from this rank's vocabulary shard of the logits."""
        index = inputs.logit_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        picked = logits.gather(1, index)[..., :self.vocab_real].float() / inputs.part.temperature
        return vocab_parallel_logprobs(picked, inputs.part.response_ids, self.vocab_start, self.tp_group,
                                       entropy_grad=entropy_grad)

    def _logprobs_of(self, inputs: MicroInputs, logits: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        logprobs, _ = self._token_logprobs(inputs, logits, entropy_grad=False)
        return logits.new_zeros(()), torch.tensor(0, dtype=torch.int), {"logprobs": logprobs}

    def _loss_of(self, loss: PolicyLoss, norm: LossNorm, mismatch: bool, inputs: MicroInputs,
                 logits: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        part = inputs.part
        logprobs, entropy = self._token_logprobs(inputs, logits, entropy_grad=loss.needs_entropy)
        value, metrics = loss(LossInputs(
            logprobs=logprobs, advantages=part.advantages, mask=part.response_mask, old_logprobs=part.old_logprobs,
            rollout_logprobs=part.rollout_logprobs, ref_logprobs=part.ref_logprobs,
            entropy=entropy if loss.needs_entropy else None), norm)
        report = {name: torch.as_tensor(metric).detach() for name, metric in metrics.items()}
        report["loss"] = value.detach()
        report["entropy"] = (entropy.detach() * part.response_mask).sum() / norm.tokens
        if mismatch:
            report.update({name: torch.tensor(value) for name, value in on_policy_mismatch(logprobs, part, norm).items()})
        return value, part.response_mask.sum().int(), report

    def _step(self, mini: RolloutBatch, loss: PolicyLoss, norm: LossNorm, mismatch: bool) -> dict[str, float]:
        """One optimizer step on a mini-batch: the schedule's summed micro-batch gradients, clipped
        (`mismatch`: the update's only step, whose forward also measures `mismatch/*`)."""
        from megatron.core.distributed import finalize_model_grads

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        _, parts = self._micro_batches(mini)
        outputs = self._schedule(self.ddp, parts, partial(self._loss_of, loss, norm, mismatch), forward_only=False)
        finalize_model_grads([self.ddp])
        metrics: dict[str, float] = {}
        for output in outputs:
            combine(metrics, {name: float(value) for name, value in output.items()})
        grad_norm = self._clip_gradients()
        loss_value = self._from_last_stage(metrics.get("loss", 0.0))
        lr = self.optimizer.param_groups[0]["lr"]
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingError(
                f"non-finite loss {loss_value} (grad_norm {grad_norm}) at optimizer step {self.steps + 1}; "
                f"the step was not applied. Lower backend.lr (now {lr:g}), check that rewards and advantages "
                "are finite, or use backend.dtype=float32 if training in bfloat16.")
        self.optimizer.step()
        self.scheduler.step()
        self.steps += 1
        return {**metrics, "grad_norm": grad_norm, "lr": lr}

    def _clip_gradients(self) -> float:
        """Hand DDP's gradient buffers to the optimizer and clip them by the global norm over the
        model-parallel group, counting tensor-parallel duplicates and tied embedding copies once."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = p.main_grad
        owned = [p.grad for p in params if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
        square = torch.zeros((), device=self.device)
        for grad in owned:
            square += grad.float().pow(2).sum()
        dist.all_reduce(square, group=self.model_parallel_group)
        norm = square.sqrt()
        if self.opts.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.opts.max_grad_norm, norm)
        return float(norm)

    def _from_last_stage(self, value: float) -> float:
        """A number the last pipeline stage computed, on every rank (so all ranks agree to step or stop)."""
        from megatron.core import parallel_state

        t = torch.tensor(value if self.last_stage else 0.0, device=self.device, dtype=torch.float64)
        if self.opts.pp > 1:
            dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
        return float(t)
