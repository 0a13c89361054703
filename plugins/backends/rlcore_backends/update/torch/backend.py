"""Single-process PyTorch update backend: AdamW with an LR schedule, gradient clipping, length-bucketed micro-batches.

The policy's master weights stay float32; `dtype: bfloat16` runs forward passes under autocast,
`bfloat16_matched` through `common.matched` (bf16 matmuls that compute the hf rollout's bits). The
reference model (a frozen copy of the starting policy) is loaded on the first reference `logprobs` call,
so algorithms without KL never pay for it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from rlcore import LossNorm, PolicyLoss, RolloutBatch, UpdatePlan, Weights, hookimpl
from rlcore.config import check_choice
from rlcore.context import RunContext
from rlcore.errors import ConfigError
from rlcore.metrics import combine, mean_over_steps
from rlcore.models import load_model, read_config
from rlcore_backends.common import micro_batches
from rlcore_backends.common.auto_dtype import config_counts, settle_dtype
from rlcore_backends.common.export import load_cpu_model, write_model_dir
from rlcore_backends.common.matched import match
from rlcore_backends.common.policy_pass import logprobs_pass, loss_pass, non_finite_error
from rlcore_backends.common.train_options import (TrainOptions, apply_lr, autocast, build_optimizer,
                                                   enable_gradient_checkpointing, with_run_length)
from rlcore_backends.common.weights import load_saved_weights


@attrs.define
class TorchOptions(TrainOptions):
    """The trainer options, with the torch backend's own precision."""

    dtype: Literal["auto", "float32", "bfloat16", "bfloat16_matched"] = attrs.field(
        default="auto", validator=check_choice("auto", "float32", "bfloat16", "bfloat16_matched"))
    """Compute dtype (weights and optimizer stay float32): bfloat16 runs forward passes under autocast;
    bfloat16_matched runs the decoder's matmuls in bfloat16 chunks that give each row the same bits however
    many rows a pass holds, attention in float64 and the rest in float32, so with the hf rollout in
    bfloat16_matched too both sides compute the same logprobs; auto: float32 or bfloat16_matched, whichever
    this machine measures faster (`common.auto_dtype`; config.yaml records the choice). README: "Precision"."""


class TorchBackend:
    """Trains the policy in this process with plain PyTorch on the hardware plugin's device."""

    Options = TorchOptions

    def __init__(self, options: TrainOptions) -> None:
        self.options = options
        self.model: Any = None
        self.reference: Any = None
        self.spec: Any = None
        self.device = torch.device("cpu")
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.steps = 0

    @hookimpl
    def settle_options(self, config: dict[str, Any], model_config: Any) -> dict[str, Any] | None:
        """`dtype: auto` made float32 or bfloat16_matched, as measured on this machine."""
        if getattr(self.options, "dtype", None) != "auto":
            return None
        return {"backend": {"dtype": settle_dtype(config, "backend", lambda: config_counts(model_config))}}

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Load the policy (float32 master weights) on the hardware's device; build AdamW and the LR schedule."""
        self.device, self.spec = ctx.hardware.device(), ctx.model
        self.options = with_run_length(self.options, ctx.config)
        self.model = self._load_policy(ctx)
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), self.options)

    @hookimpl
    def logprobs(self, batch: RolloutBatch, reference: bool) -> Tensor:
        """No-grad logprobs of logits / batch.temperature, 0 outside `attention_mask`, on the batch's device."""
        out = torch.zeros(batch.response_ids.shape)
        order, passes = micro_batches.by_length(batch, self.options.micro_batch_tokens,
                                                micro_batches.pass_cost_tokens(self.device))
        rows = batch.select(order)
        with self._scoring_model(reference) as model:
            for mb in passes:
                part = micro_batches.take(rows, mb).to(self.device)
                out[order[mb.start:mb.stop], :mb.response_width] = logprobs_pass(
                    model, part, self._autocast(), self.options.share_prompts).cpu()
        return out.masked_fill(batch.attention_mask.cpu() == 0, 0.0).to(batch.response_ids.device)

    @hookimpl
    def update(self, batch: RolloutBatch, loss: PolicyLoss, plan: UpdatePlan) -> dict[str, float]:
        """One optimizer step per mini-batch per epoch; metrics are means over those steps, except
        `update/seconds` and `update/tokens_per_s` (prompt + response tokens processed), which cover the call."""
        start = time.perf_counter()
        self.model.train()
        max_len = plan.max_response_length or batch.response_ids.shape[1]
        sums: dict[str, float] = {}
        steps = tokens = 0
        for _ in range(plan.epochs):
            for mini in batch.split(math.ceil(len(batch) / plan.mini_batches)):
                combine(sums, self._step(mini, loss, LossNorm.of(mini.response_mask, max_len),
                                         mismatch=plan.epochs * plan.mini_batches == 1))
                steps += 1
                tokens += int(mini.prompt_mask.sum() + mini.attention_mask.sum())
        seconds = time.perf_counter() - start
        return {**mean_over_steps(sums, steps),
                "update/seconds": seconds, "update/tokens_per_s": tokens / seconds}

    @hookimpl
    def policy_weights(self) -> Weights:
        """The live model and its state dict; `version` counts optimizer steps."""
        return Weights(named_tensors=lambda: iter(self.model.state_dict().items()), version=self.steps,
                       module=self.model)

    @hookimpl
    def save_state(self, directory: Path) -> None:
        """`model/` (safetensors and tokenizer: a loadable model directory) and `trainer.pt` (optimizer,
        scheduler, step count)."""
        directory = Path(directory)
        write_model_dir(self.model, self.spec.tokenizer, directory / "model")
        self._save_trainer(directory)

    @hookimpl
    def load_state(self, directory: Path) -> None:
        """Restore what `save_state` wrote into the live model and optimizer, so training resumes bit-identically."""
        directory = Path(directory)
        load_saved_weights(self.model, directory / "model")
        self._load_trainer(directory)

    @hookimpl
    def export_model(self, checkpoint: Path, out: Path, ctx: RunContext) -> Path:
        """The checkpoint's `model/` directory, loaded and saved again with the run's tokenizer."""
        return write_model_dir(load_cpu_model(Path(checkpoint) / "model"), ctx.model.tokenizer, Path(out))

    # ---- helpers that subclasses (lora) override ---------------------------------------------------

    def _load_policy(self, ctx: RunContext) -> Any:
        """The trainable policy on this backend's device (`dtype: auto` settled here when a run was not started
        by `rlcore run`, which settles it in config.yaml)."""
        if self.options.dtype == "auto":  # the shapes from the config, as the hf rollout reads them: one choice
            self.options = attrs.evolve(self.options, dtype=settle_dtype(
                ctx.config, "backend", lambda: config_counts(read_config(str(ctx.model.path)))))
        model = self._precision(load_model(ctx.model, torch.float32, self.device))
        if self.options.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def _precision(self, model: Any) -> Any:
        """`model` made to compute in `dtype: bfloat16_matched` where that is the dtype, else as it is."""
        if self.options.dtype == "bfloat16_matched":
            try:
                match(model)
            except ValueError as e:
                raise ConfigError(f"backend.dtype=bfloat16_matched: {e}; use float32 here") from None
        return model

    @contextlib.contextmanager
    def _scoring_model(self, reference: bool) -> Iterator[Any]:
        """The policy, or the frozen reference policy (loaded on first use), in eval mode."""
        if reference and self.reference is None:
            self.reference = self._precision(load_model(self.spec, torch.float32, self.device))
            self.reference.eval().requires_grad_(False)
        yield self.reference if reference else self.model.eval()

    def _save_trainer(self, directory: Path) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "steps": self.steps}, directory / "trainer.pt")

    def _load_trainer(self, directory: Path) -> None:
        state = torch.load(directory / "trainer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        apply_lr(self.optimizer, self.scheduler, self.options.lr)
        self.steps = state["steps"]

    # ---- one optimizer step -----------------------------------------------------------------------

    def _step(self, mini: RolloutBatch, loss: PolicyLoss, norm: LossNorm, mismatch: bool) -> dict[str, float]:
        """One optimizer step on a mini-batch: micro-batch losses summed through backward, then clip and step;
        `mismatch`: the only step of the update, so its forward also measures `mismatch/*`."""
        metrics: dict[str, float] = {}
        order, passes = micro_batches.by_length(mini, self.options.micro_batch_tokens,
                                                micro_batches.pass_cost_tokens(self.device))
        rows = mini.select(order)  # the loss sums over micro-batches, so their order does not matter
        for mb in passes:
            value, part_metrics = loss_pass(self.model, micro_batches.take(rows, mb).to(self.device), loss, norm,
                                            self._autocast(), self.options.keep_logits_mib, mismatch,
                                            self.options.share_prompts)
            value.backward()
            combine(metrics, part_metrics)
        max_norm = self.options.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise non_finite_error(metrics["loss"], grad_norm, self.steps + 1, lr)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {**metrics, "grad_norm": grad_norm, "lr": lr}

    def _autocast(self) -> torch.autocast:
        return autocast(self.device, self.options.dtype)
