"""Options and optimizer shared by every trainer backend (torch, fsdp, lora, megatron): AdamW and its
learning-rate schedule (linear warmup, then constant, linear or cosine decay to a minimum ratio)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Literal, TypeVar

import attrs
import torch

from rlcore.config import check_choice, check_range
from rlcore.errors import ConfigError
from rlcore_backends.common.dtypes import DTYPES

log = logging.getLogger("rlcore")

SCHEDULES = ("constant", "linear", "cosine")
O = TypeVar("O", bound="OptimizerOptions")


@attrs.define
class OptimizerOptions:
    """What every trainer backend needs to take optimizer steps: AdamW, warmup, clipping, micro-batches, dtype."""

    RESUMABLE = ("lr", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "min_lr_ratio", "total_training_steps",
                 "max_grad_norm", "micro_batch_tokens")
    """Options a resumed run may change (`rlcore.resume`), applied from the resumed step on: the learning rate and
    its schedule (which define the run's LR curve, like `lr`), clipping and the micro-batch size; the rest (AdamW's
    betas, eps, weight decay, the dtype) is restored with the optimizer or defines the run."""

    lr: float = attrs.field(default=1e-6, validator=check_range(0.0))
    """AdamW peak learning rate (1e-6 suits full fine-tuning of a pretrained LLM)."""
    weight_decay: float = attrs.field(default=0.0, validator=check_range(0.0))
    """AdamW decoupled weight decay, applied to every trained parameter."""
    betas: tuple[float, float] = attrs.field(
        default=(0.9, 0.999), validator=attrs.validators.deep_iterable(check_range(0.0, 1.0)))
    """AdamW (beta1, beta2)."""
    eps: float = attrs.field(default=1e-8, validator=check_range(0.0))
    """AdamW epsilon."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = attrs.field(
        default="constant", validator=check_choice(*SCHEDULES))
    """The LR after warmup, named as verl's `optim.lr_scheduler_type` and Hugging Face's `get_scheduler`:
    `constant` at `lr`; `linear` or `cosine` (half a cosine) decay from `lr` to `min_lr_ratio * lr` over
    the rest of `total_training_steps`."""
    warmup_steps: int = attrs.field(default=0, validator=check_range(0))
    """Optimizer steps of linear LR warmup (the first step gets lr / warmup_steps, never 0)."""
    warmup_ratio: float = attrs.field(default=0.0, validator=check_range(0.0, 1.0))
    """Warmup as a fraction of `total_training_steps` (verl's `lr_warmup_steps_ratio`, HF's `warmup_ratio`);
    only when `warmup_steps` is 0."""
    min_lr_ratio: float = attrs.field(default=0.0, validator=check_range(0.0, 1.0))
    """Where linear and cosine decay end, as a fraction of `lr` (verl's `min_lr_ratio`, HF's `min_lr_rate`)."""
    total_training_steps: int = attrs.field(default=0, validator=check_range(0))
    """Optimizer steps the schedule spans; 0: the run's own, trainer.steps x trainer.epochs x trainer.mini_batches."""
    max_grad_norm: float = attrs.field(default=1.0, validator=check_range(0.0))
    """Clip the global gradient norm to this (0: no clipping; `grad_norm` is reported either way)."""
    micro_batch_tokens: int = attrs.field(default=16384, validator=check_range(1))
    """Padded tokens (prompt + response) per forward/backward pass at most; a micro-batch holds at least one
    sample. torch and fsdp sort the rows by length and also cut where the padding saved outweighs a pass."""
    dtype: Literal["float32", "bfloat16"] = attrs.field(
        default="float32", validator=check_choice("float32", "bfloat16"))
    """Compute dtype: bfloat16 runs forward passes under autocast (weights and optimizer stay float32)."""

    @warmup_ratio.validator
    def _one_warmup(self, _attribute: attrs.Attribute, value: float) -> None:
        if value > 0 and self.warmup_steps > 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} and warmup_ratio={value} both set the warmup; "
                             "set only one of them")


@attrs.define
class TrainOptions(OptimizerOptions):
    """The optimizer options plus what the transformers-model trainers (torch, fsdp, lora) add."""

    RESUMABLE = (*OptimizerOptions.RESUMABLE, "gradient_checkpointing", "keep_logits_mib", "share_prompts")

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    keep_logits_mib: int = attrs.field(default=1024, validator=check_range(0))
    """Float32 LM-head logits of a micro-batch's response tokens that the backward may take from the forward
    instead of recomputing them (a quarter of the LM head's FLOPs); larger micro-batches, and 0, recompute.
    Applies where the LM head runs tiled (a plain Qwen2/Qwen3/Llama/Mistral model on the torch backend)."""
    share_prompts: bool = True
    """Run a prompt that several rows of a micro-batch repeat (a group's n samples) through the model once and
    the responses on its cached keys and values, gradients included: the same loss to float32 rounding, with
    (n - 1) / n of the prompt tokens' work saved. Applies where `keep_logits_mib` does, without gradient
    checkpointing."""


@attrs.frozen
class LRSchedule:
    """The LR multiplier of every optimizer step: linear warmup, then constant, linear or cosine decay.

    After warmup it is Hugging Face's `get_scheduler(kind)` (with `min_lr_rate`) exactly; during warmup
    optimizer step s (from 0) gets (s + 1) / warmup where HF and verl give s / warmup, so no step runs at lr 0.
    """

    kind: str = "constant"
    warmup: int = 0
    total: int = 0
    min_ratio: float = 0.0

    def factor(self, step: int) -> float:
        """The multiplier of `lr` for optimizer step `step` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        decay = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def planned_steps(config: Mapping[str, Any]) -> int | None:
    """Optimizer steps a run takes (trainer.steps x epochs x mini_batches), None without a trainer section."""
    trainer = config.get("trainer") or {}
    if "steps" not in trainer:
        return None
    return int(trainer["steps"]) * int(trainer.get("epochs", 1)) * int(trainer.get("mini_batches", 1))


def _needs_length(options: OptimizerOptions) -> bool:
    return options.lr_scheduler_type != "constant" or options.warmup_ratio > 0


def _no_length(options: OptimizerOptions) -> ConfigError:
    return ConfigError(f"backend.lr_scheduler_type={options.lr_scheduler_type} (warmup_ratio={options.warmup_ratio}) "
                       "needs the schedule's length and this run has none: set backend.total_training_steps "
                       "(optimizer steps)")


def with_run_length(options: O, config: Mapping[str, Any]) -> O:
    """`options` with `total_training_steps` taken from the run's resolved `config` when the schedule needs a
    length (a decay or a warmup ratio) and none is set; backends call it in `setup`, before any worker starts."""
    if options.total_training_steps or not _needs_length(options):
        return options
    total = planned_steps(config)
    if not total:
        raise _no_length(options)
    return attrs.evolve(options, total_training_steps=total)


def schedule_of(options: OptimizerOptions) -> LRSchedule:
    """The schedule the options ask for (`total_training_steps` filled in by `with_run_length`)."""
    total = options.total_training_steps
    if total == 0 and _needs_length(options):
        raise _no_length(options)
    warmup = options.warmup_steps or round(options.warmup_ratio * total)
    return LRSchedule(options.lr_scheduler_type, warmup, total, options.min_lr_ratio)


class ScheduledLR(torch.optim.lr_scheduler.LambdaLR):
    """`LambdaLR` over an `LRSchedule`. Its checkpoint state names the schedule, so resuming with another one
    (e.g. a longer run stretches a cosine) is logged instead of silently changing the LR curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> None:
        self._schedule = schedule
        super().__init__(optimizer, partial(_factor, schedule=schedule))

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in super().state_dict().items() if k != "_schedule"}
        return {**state, "schedule": attrs.asdict(self._schedule)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.pop("schedule", None)
        if saved is not None and LRSchedule(**saved) != self._schedule:
            log.warning("the LR schedule differs from the checkpoint's (%s now, %s then); from optimizer step %d "
                        "on the LR follows the new one", self._schedule, LRSchedule(**saved), state["last_epoch"])
        state["_schedule"] = self._schedule
        super().load_state_dict(state)


def _factor(step: int, schedule: LRSchedule) -> float:
    return schedule.factor(step)


def build_optimizer(params: Iterable[torch.nn.Parameter], options: OptimizerOptions
                    ) -> tuple[torch.optim.AdamW, ScheduledLR]:
    """AdamW over the parameters that require grad, and its LR schedule.

    The fused AdamW kernel when every parameter is a floating-point CPU or CUDA tensor: on a CPU torch's
    default is a per-parameter loop, about 6x slower than fused on a 50M-parameter model.
    """
    trained = [p for p in params if p.requires_grad]
    fused = bool(trained) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trained)
    optimizer = torch.optim.AdamW(trained, lr=options.lr, betas=tuple(options.betas), eps=options.eps,
                                  weight_decay=options.weight_decay, fused=fused or None)
    return optimizer, ScheduledLR(optimizer, schedule_of(options))


def apply_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After loading a checkpoint's optimizer and scheduler: make `lr` (this run's `lr` option, which a resume
    may have changed) the peak learning rate from the current step on, on the schedule of this run's options
    (`ScheduledLR` keeps this run's). Loading restored the saved run's rate; with unchanged options this sets
    the same values."""
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
