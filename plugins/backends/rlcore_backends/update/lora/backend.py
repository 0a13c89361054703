"""LoRA update backend: peft LoRA adapters trained on a frozen base model, in this process (`base: torch`,
the torch backend) or FSDP2-sharded over `world_size` processes (`base: fsdp`, the fsdp backend's ranks,
each peft-wrapping the model before `fully_shard`).

The reference policy is the base model itself (the adapters disabled), so KL losses cost no second copy.
`sync_weights` gets full weights with the adapters merged (any rollout loads them) or, with
`sync: adapter`, only the adapters and their peft config (for engines that serve LoRA adapters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import attrs

from torch import Tensor

from rlcore import PolicyLoss, RolloutBatch, UpdatePlan, Weights, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.context import RunContext
from rlcore_backends.common.adapters import (add_lora, adapter_config, adapter_state_dict, load_adapters,
                                     merge_saved_adapters, merged_state_dict)
from rlcore_backends.common.export import load_cpu_model, write_model_dir
from rlcore_backends.update.fsdp.backend import FSDPBackend
from rlcore_backends.update.fsdp.worker import ADAPTER_DIR, LoRASpec
from rlcore_backends.update.torch.backend import TorchBackend

__all__ = ["ADAPTER_DIR", "LoRABackend"]
"""`ADAPTER_DIR`: where a checkpoint keeps the adapters, in peft's `save_pretrained` format."""


class LoRABackend(TorchBackend):
    """Trains LoRA adapters (peft) in this process; the base model's weights stay frozen."""

    @attrs.define
    class Options(FSDPBackend.Options):
        """The fsdp backend's options (`world_size`, `param_dtype`, ... apply with `base: fsdp` only) and LoRA's."""

        base: Literal["torch", "fsdp"] = attrs.field(default="torch", validator=check_choice("torch", "fsdp"))
        """torch: one process, as the torch backend; fsdp: FSDP2 over `world_size` processes, as the fsdp backend."""
        lr: float = attrs.field(default=1e-5, validator=check_range(0.0))
        """AdamW peak learning rate (LoRA needs ~10x the full fine-tuning rate)."""
        rank: int = attrs.field(default=16, validator=check_range(1))
        """LoRA rank r of each adapter."""
        alpha: float = attrs.field(default=32.0, validator=check_range(0.0))
        """LoRA alpha: the adapter's update B A is scaled by alpha / rank."""
        dropout: float = attrs.field(default=0.0, validator=check_range(0.0, 1.0))
        """Dropout on the adapter's input while training."""
        target_modules: list[str] = attrs.field(factory=lambda: ["all-linear"])
        """Names (or name suffixes) of the modules that get adapters; `all-linear`: every linear layer
        except the LM head."""
        sync: Literal["merged", "adapter"] = attrs.field(default="merged", validator=check_choice("merged", "adapter"))
        """What `sync_weights` gets: full weights with the adapters merged (every rollout, hf included), or
        the adapters alone with their peft config (a rollout that serves LoRA adapters, e.g. vLLM)."""

        def __attrs_post_init__(self) -> None:
            mixed = [f"{name}={getattr(self, name)}" for name in ("param_dtype", "reduce_dtype")
                     if getattr(self, name) != "float32"]
            if self.base == "torch" and mixed:
                raise ValueError(f"{', '.join(mixed)} is FSDP's mixed precision, which base='torch' does not run: "
                                 f"set base='fsdp', or dtype='bfloat16' for autocast in one process")

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.fsdp: FSDPBackend | None = None
        """`base: fsdp`: the fsdp backend whose ranks train the adapters; every hook goes to it."""

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """`base: torch`: the peft-wrapped policy here; `base: fsdp`: start the ranks, each wrapping it."""
        opts = self.options
        if opts.base == "fsdp":
            self.fsdp = FSDPBackend(opts, lora=LoRASpec(opts.rank, opts.alpha, opts.dropout, list(opts.target_modules)))
            self.fsdp.setup(ctx=ctx)
        else:
            super().setup(ctx=ctx)

    @hookimpl
    def logprobs(self, batch: RolloutBatch, reference: bool) -> Tensor:
        if self.fsdp is not None:
            return self.fsdp.logprobs(batch=batch, reference=reference)
        return super().logprobs(batch=batch, reference=reference)

    @hookimpl
    def update(self, batch: RolloutBatch, loss: PolicyLoss, plan: UpdatePlan) -> dict[str, float]:
        if self.fsdp is not None:
            metrics = self.fsdp.update(batch=batch, loss=loss, plan=plan)
            self.steps = self.fsdp.steps
            return metrics
        return super().update(batch=batch, loss=loss, plan=plan)

    @hookimpl
    def policy_weights(self) -> Weights:
        """Merged full weights or adapters, as the `sync` option says (`merged_weights` and
        `adapter_weights` give either form)."""
        return self.adapter_weights() if self.options.sync == "adapter" else self.merged_weights()

    @hookimpl
    def save_state(self, directory: Path) -> None:
        """`adapter/` (peft `save_pretrained`: adapter_config.json, adapter_model.safetensors) and
        `trainer.pt` (optimizer, scheduler, step count); `base: fsdp` adds `dcp/` (the sharded adapters
        and optimizer) and keeps only the scheduler and step count in `trainer.pt`. The frozen base is the
        run's model."""
        directory = Path(directory)
        if self.fsdp is not None:
            self.fsdp.save_state(directory=directory)
            return
        self.model.save_pretrained(directory / ADAPTER_DIR)
        self._save_trainer(directory)

    @hookimpl
    def load_state(self, directory: Path) -> None:
        """Restore the adapters and the optimizer, so training resumes bit-identically."""
        directory = Path(directory)
        if self.fsdp is not None:
            self.fsdp.load_state(directory=directory)
            self.steps = self.fsdp.steps
            return
        load_adapters(self.model, directory / ADAPTER_DIR, self.device)
        self._load_trainer(directory)

    @hookimpl
    def teardown(self) -> None:
        """`base: fsdp`: close the ranks."""
        if self.fsdp is not None:
            self.fsdp.teardown()
            self.fsdp = None

    @hookimpl
    def export_model(self, checkpoint: Path, out: Path, ctx: RunContext) -> Path:
        """The base model with the checkpoint's adapters merged in, saved with the run's tokenizer."""
        model = merge_saved_adapters(load_cpu_model(ctx.model.path), Path(checkpoint) / ADAPTER_DIR)
        return write_model_dir(model, ctx.model.tokenizer, Path(out))

    def merged_weights(self) -> Weights:
        """Full weights under the base model's names, each adapter merged in (the live model is untouched)."""
        if self.fsdp is not None:
            return self.fsdp.lora_weights(merged=True)
        state = merged_state_dict(self.model)
        return Weights(named_tensors=lambda: iter(state.items()), version=self.steps)

    def adapter_weights(self) -> Weights:
        """The adapters alone, under peft's names, with their peft config."""
        if self.fsdp is not None:
            return self.fsdp.lora_weights(merged=False)
        state = adapter_state_dict(self.model)
        return Weights(named_tensors=lambda: iter(state.items()), version=self.steps, adapter=True,
                       adapter_config=adapter_config(self.model))

    def _load_policy(self, ctx: RunContext) -> Any:
        """The base policy with fresh adapters; only the adapters require grad (and so get AdamW state)."""
        opts = self.options
        return add_lora(super()._load_policy(ctx), opts.rank, opts.alpha, opts.dropout, opts.target_modules)

    @contextlib.contextmanager
    def _scoring_model(self, reference: bool) -> Iterator[Any]:
        """The policy, or (adapters disabled) the frozen base model it started from, in eval mode."""
        self.model.eval()
        with self.model.disable_adapter() if reference else contextlib.nullcontext():
            yield self.model
