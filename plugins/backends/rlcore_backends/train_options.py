"""Options and optimizer shared by every trainer backend (torch, fsdp, lora): AdamW with linear warmup."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Literal

import attrs
import torch

from rlcore.config import check_choice, check_range

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@attrs.define
class TrainOptions:
    """What a trainer backend needs to take optimizer steps: AdamW, warmup, clipping, micro-batches, dtype."""

    RESUMABLE = ("lr", "warmup_steps", "max_grad_norm", "micro_batch_tokens", "gradient_checkpointing",
                 "keep_logits_mib")
    """Options a resumed run may change (`rlcore.resume`): the schedule, clipping and memory/speed knobs; the
    rest (AdamW's betas, eps, weight decay, dtype, ...) is restored with the optimizer or defines the run."""

    lr: float = attrs.field(default=1e-6, validator=check_range(0.0))
    """AdamW peak learning rate (1e-6 suits full fine-tuning of a pretrained LLM)."""
    weight_decay: float = attrs.field(default=0.0, validator=check_range(0.0))
    """AdamW decoupled weight decay, applied to every trained parameter."""
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
    keep_logits_mib: int = attrs.field(default=1024, validator=check_range(0))
    """Float32 LM-head logits of a micro-batch's response tokens that the backward may take from the forward
    instead of recomputing them (a quarter of the LM head's FLOPs); larger micro-batches, and 0, recompute.
    Applies where the LM head runs tiled (a plain Qwen2/Qwen3/Llama/Mistral model on the torch backend)."""


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup over the first `warmup_steps` optimizer steps (the first step gets lr / warmup_steps),
    constant after."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_optimizer(params: Iterable[torch.nn.Parameter], options: TrainOptions
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the parameters that require grad, and its warmup schedule.

    The fused AdamW kernel when every parameter is a floating-point CPU or CUDA tensor: on a CPU torch's
    default is a per-parameter loop, about 6x slower than fused on a 50M-parameter model.
    """
    trained = [p for p in params if p.requires_grad]
    fused = bool(trained) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trained)
    optimizer = torch.optim.AdamW(trained, lr=options.lr, betas=tuple(options.betas), eps=options.eps,
                                  weight_decay=options.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_factor, warmup_steps=options.warmup_steps))
    return optimizer, scheduler


def apply_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After loading a checkpoint's optimizer and scheduler: make `lr` (this run's `lr` option, which a resume
    may have changed) the peak learning rate from the current step on, on the schedule of this run's
    options. Loading restored the saved run's rate; with an unchanged `lr` this sets the same values."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers model."""
    # transformers 5 renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def autocast(device: torch.device, dtype: str) -> torch.autocast:
    """Autocast to bfloat16 when `dtype` says so, a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
