"""LoRA update backend: the torch backend training only peft LoRA adapters on a frozen base model.

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

from rlcore import Weights, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.context import RunContext
from rlcore_backends.adapters import (add_lora, adapter_config, adapter_state_dict, load_adapters,
                                     merge_saved_adapters, merged_state_dict)
from rlcore_backends.export import load_cpu_model, write_model_dir
from rlcore_backends.torch_backend import TorchBackend
from rlcore_backends.train_options import TrainOptions

ADAPTER_DIR = "adapter"
"""Where a checkpoint keeps the adapters, in peft's `save_pretrained` format."""


class LoRABackend(TorchBackend):
    """Trains LoRA adapters (peft) in this process; the base model's weights stay frozen."""

    @attrs.define
    class Options(TrainOptions):
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

    @hookimpl
    def policy_weights(self) -> Weights:
        """Merged full weights or adapters, as the `sync` option says (`merged_weights` and
        `adapter_weights` give either form)."""
        return self.adapter_weights() if self.options.sync == "adapter" else self.merged_weights()

    @hookimpl
    def save_state(self, directory: Path) -> None:
        """`adapter/` (peft `save_pretrained`: adapter_config.json, adapter_model.safetensors) and
        `trainer.pt` (optimizer, scheduler, step count); the frozen base is the run's model."""
        directory = Path(directory)
        self.model.save_pretrained(directory / ADAPTER_DIR)
        self._save_trainer(directory)

    @hookimpl
    def load_state(self, directory: Path) -> None:
        """Restore the adapters and the optimizer, so training resumes bit-identically."""
        directory = Path(directory)
        load_adapters(self.model, directory / ADAPTER_DIR, self.device)
        self._load_trainer(directory)

    @hookimpl
    def export_model(self, checkpoint: Path, out: Path, ctx: RunContext) -> Path:
        """The base model with the checkpoint's adapters merged in, saved with the run's tokenizer."""
        model = merge_saved_adapters(load_cpu_model(ctx.model.path), Path(checkpoint) / ADAPTER_DIR)
        return write_model_dir(model, ctx.model.tokenizer, Path(out))

    def merged_weights(self) -> Weights:
        """Full weights under the base model's names, each adapter merged in (the live model is untouched)."""
        state = merged_state_dict(self.model)
        return Weights(named_tensors=lambda: iter(state.items()), version=self.steps)

    def adapter_weights(self) -> Weights:
        """The adapters alone, under peft's names, with their peft config."""
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
