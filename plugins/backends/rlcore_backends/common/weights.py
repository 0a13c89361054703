"""Copying named weights into a live model, shared by `sync_weights` and `load_state`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from rlcore.errors import RLCoreError


@torch.no_grad()
def copy_weights(model: torch.nn.Module, tensors: Iterable[tuple[str, Tensor]]) -> int:
    """Copy (name, tensor) pairs into `model`'s parameters and buffers, casting dtype and device.

    Every parameter must be given (a tied alias such as `lm_head.weight` may be left out); returns the
    number of tensors copied.
    """
    own = model.state_dict()
    copied: set[str] = set()
    for name, tensor in tensors:
        if name in own:
            own[name].copy_(tensor)
            copied.add(name)
    missing = [name for name, _ in model.named_parameters() if name not in copied]
    if missing:
        raise RLCoreError(f"weights are missing {len(missing)} parameters of the model, e.g. {missing[:3]}: "
                          "the trainer and rollout must hold the same architecture")
    return len(copied)


def read_safetensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of the `*.safetensors` files (one or several shards) in `directory`."""
    out: dict[str, Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def load_saved_weights(model: torch.nn.Module, directory: Path) -> int:
    """Copy the weights of a saved model directory into `model`: its safetensors as stored, or, when their
    names are a checkpoint layout that transformers renames on loading (Qwen2.5-VL saves `visual.*` and
    `model.layers.*` for its `model.visual.*` and `model.language_model.layers.*`), through `from_pretrained`."""
    tensors = read_safetensors(directory)
    names = {name for name, _ in model.named_parameters()}
    if names <= tensors.keys() | {"lm_head.weight"}:
        return copy_weights(model, tensors.items())
    from rlcore import ModelSpec
    from rlcore.models import load_model

    return copy_weights(model, load_model(ModelSpec(path=str(directory)), torch.float32, "cpu").state_dict().items())
