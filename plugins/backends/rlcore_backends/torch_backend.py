"""Single-process PyTorch update backend: AdamW with warmup, gradient clipping, token-budget micro-batches.

The policy's master weights stay float32; `dtype: bfloat16` runs forward passes under autocast. The
reference model (a frozen copy of the starting policy) is loaded on the first reference `logprobs` call,
so algorithms without KL never pay for it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from rlcore import LossInputs, LossNorm, PolicyLoss, RolloutBatch, UpdatePlan, Weights, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.context import RunContext
from rlcore.errors import TrainingError
from rlcore.models import load_model
from rlcore_backends import micro_batches
from rlcore_backends.logprobs import response_logits, token_entropy, token_logprobs
from rlcore_backends.weights import copy_weights, read_safetensors


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup over the first `warmup_steps` optimizer steps (the first step gets lr / warmup_steps),
    constant after."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class TorchBackend:
    """Trains the policy in this process with plain PyTorch on the hardware plugin's device."""

    @attrs.define
    class Options:
        lr: float = attrs.field(default=1e-6, validator=check_range(0.0))
        """AdamW peak learning rate (1e-6 suits full fine-tuning of a pretrained LLM)."""
        weight_decay: float = attrs.field(default=0.0, validator=check_range(0.0))
        """AdamW decoupled weight decay, applied to every parameter."""
        betas: tuple[float, float] = attrs.field(
            default=(0.9, 0.999), validator=attrs.validators.deep_iterable(check_range(0.0, 1.0)))
        """AdamW (beta1, beta2)."""
        eps: float = attrs.field(default=1e-8, validator=check_range(0.0))
        """AdamW epsilon."""
        warmup_steps: int = attrs.field(default=0, validator=check_range(0))
        """Optimizer steps of linear LR warmup; the LR is constant afterwards."""
        max_grad_norm: float = attrs.field(default=1.0, validator=check_range(0.0))
        """Clip the global gradient norm to this (0: no clipping; `grad_norm` is reported either way)."""
        micro_batch_tokens: int = attrs.field(default=16384, validator=check_range(1))
        """Padded tokens (prompt + response) per forward/backward pass; a micro-batch holds at least one sample."""
        dtype: Literal["float32", "bfloat16"] = attrs.field(
            default="float32", validator=check_choice("float32", "bfloat16"))
        """Compute dtype: bfloat16 runs forward passes under autocast (weights and optimizer stay float32)."""
        gradient_checkpointing: bool = False
        """Recompute activations in the backward pass: less memory, ~30% more compute."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.model: Any = None
        self.reference: Any = None
        self.spec: Any = None
        self.device = torch.device("cpu")
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.steps = 0

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Load the policy (float32 master weights) on the hardware's device; build AdamW and the LR schedule."""
        opts = self.options
        self.device, self.spec = ctx.hardware.device(), ctx.model
        self.model = load_model(ctx.model, torch.float32, self.device)
        if opts.gradient_checkpointing:
            # transformers 5 renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable
            enable = getattr(self.model, "activation_checkpointing_enable", None) or \
                self.model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opts.lr, betas=tuple(opts.betas),
                                           eps=opts.eps, weight_decay=opts.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(warmup_factor, warmup_steps=opts.warmup_steps))

    @hookimpl
    def logprobs(self, batch: RolloutBatch, reference: bool) -> Tensor:
        """No-grad logprobs of logits / batch.temperature, 0 outside `attention_mask`, on the batch's device."""
        model = self._reference() if reference else self.model.eval()
        out = torch.zeros(batch.response_ids.shape)
        with torch.no_grad():
            for mb in micro_batches.plan(batch, self.options.micro_batch_tokens):
                part = micro_batches.take(batch, mb).to(self.device)
                ids, mask = part.sequences()
                with self._autocast():
                    logits = response_logits(model, ids, mask, mb.response_width, batch.temperature)
                out[mb.start:mb.stop, :mb.response_width] = token_logprobs(logits, part.response_ids).cpu()
        return out.masked_fill(batch.attention_mask.cpu() == 0, 0.0).to(batch.response_ids.device)

    @hookimpl
    def update(self, batch: RolloutBatch, loss: PolicyLoss, plan: UpdatePlan) -> dict[str, float]:
        """One optimizer step per mini-batch per epoch; metrics are means over those steps, except
        `update/seconds` and `update/tokens_per_s` (prompt + response tokens processed), which cover the call."""
        start = time.perf_counter()
        self.model.train()
        max_len = plan.max_response_length or batch.response_ids.shape[1]
        sums: dict[str, float] = defaultdict(float)
        steps = tokens = 0
        for _ in range(plan.epochs):
            for mini in batch.split(math.ceil(len(batch) / plan.mini_batches)):
                mask = mini.response_mask
                norm = LossNorm(tokens=max(float(mask.sum()), 1.0),
                                sequences=max(float((mask.sum(-1) > 0).sum()), 1.0), max_response_length=max_len)
                for name, value in self._step(mini, loss, norm).items():
                    sums[name] += value
                steps += 1
                tokens += int(mini.prompt_mask.sum() + mini.attention_mask.sum())
        seconds = time.perf_counter() - start
        return {**{name: value / steps for name, value in sums.items()},
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
        self.model.save_pretrained(directory / "model")
        if self.spec.tokenizer is not None:
            self.spec.tokenizer.save_pretrained(directory / "model")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "steps": self.steps}, directory / "trainer.pt")

    @hookimpl
    def load_state(self, directory: Path) -> None:
        """Restore what `save_state` wrote into the live model and optimizer, so training resumes bit-identically."""
        directory = Path(directory)
        copy_weights(self.model, read_safetensors(directory / "model").items())
        state = torch.load(directory / "trainer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]

    def _step(self, mini: RolloutBatch, loss: PolicyLoss, norm: LossNorm) -> dict[str, float]:
        """One optimizer step on a mini-batch: micro-batch losses summed through backward, then clip and step."""
        metrics: dict[str, float] = defaultdict(float)
        for mb in micro_batches.plan(mini, self.options.micro_batch_tokens):
            part = micro_batches.take(mini, mb).to(self.device)
            ids, mask = part.sequences()
            with self._autocast():
                logits = response_logits(self.model, ids, mask, mb.response_width, mini.temperature)
            with torch.set_grad_enabled(loss.needs_entropy):
                entropy = token_entropy(logits)
            inputs = LossInputs(
                logprobs=token_logprobs(logits, part.response_ids), advantages=part.advantages,
                mask=part.response_mask, old_logprobs=part.old_logprobs, rollout_logprobs=part.rollout_logprobs,
                ref_logprobs=part.ref_logprobs, entropy=entropy if loss.needs_entropy else None)
            value, loss_metrics = loss(inputs, norm)
            value.backward()
            metrics["loss"] += float(value.detach())
            metrics["entropy"] += float((entropy.detach() * part.response_mask).sum()) / norm.tokens
            for name, metric in loss_metrics.items():
                metrics[name] += float(metric)
        max_norm = self.options.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"non-finite loss {metrics['loss']} (grad_norm {grad_norm}) at optimizer step {self.steps + 1}; "
                f"the step was not applied. Lower backend.lr (now {lr:g}), check that rewards and advantages "
                "are finite, or use backend.dtype=float32 if training in bfloat16.")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {**metrics, "grad_norm": grad_norm, "lr": lr}

    def _reference(self) -> Any:
        """The frozen reference policy, loaded on first use."""
        if self.reference is None:
            self.reference = load_model(self.spec, torch.float32, self.device).eval().requires_grad_(False)
        return self.reference

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.dtype == "bfloat16")
