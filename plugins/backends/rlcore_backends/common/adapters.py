"""LoRA adapters with peft: wrapping a model, and its weights as adapters or merged into full weights."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from rlcore.errors import ConfigError

try:
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
except ImportError as e:
    raise ImportError(f"LoRA needs peft ({e}): pip install 'rlcore-backends[lora]'") from e

ADAPTER = "default"
"""peft's name for the one adapter a backend trains."""


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> Any:
    """`model` wrapped by peft with fresh LoRA adapters (B = 0, so the policy starts unchanged); only the
    adapters require grad. `target_modules == ["all-linear"]` adapts every linear layer but the LM head."""
    targets: Any = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with _quiet_peft():
        return get_peft_model(model, config, adapter_name=ADAPTER)


def adapter_config(peft_model: Any) -> dict[str, Any]:
    """The adapter's peft config as plain JSON data (what `adapter_config.json` holds)."""
    return json.loads(json.dumps(peft_model.peft_config[ADAPTER].to_dict(), default=sorted))


@torch.no_grad()
def adapter_state_dict(peft_model: Any) -> dict[str, Tensor]:
    """The adapter weights under peft's file names (`base_model.model.<module>.lora_A.weight`, ...), as
    `save_pretrained` writes them and vLLM's LoRA loader reads them."""
    return {name: t.detach().clone() for name, t in get_peft_model_state_dict(peft_model, adapter_name=ADAPTER).items()}


@torch.no_grad()
def merged_state_dict(peft_model: Any) -> dict[str, Tensor]:
    """Full weights under the base model's names with each adapter's update added (W + B A * alpha / r),
    computed aside: the live model keeps its separate base weights and adapters. Weights without an
    adapter are the frozen base tensors themselves, not copies."""
    base = peft_model.get_base_model()
    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(ADAPTER)
              for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    merged = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        merged[name.replace(".base_layer.", ".")] = tensor + deltas[name] if name in deltas else tensor
    return merged


def lora_scalings(peft_model: Any) -> dict[str, float]:
    """alpha / r of every adapted layer, by its base weight's name in the peft model's state dict
    (`base_model.model.<module>.base_layer.weight`)."""
    return {f"{name}.base_layer.weight": float(module.scaling[ADAPTER])
            for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def merge_full_state(state: dict[str, Tensor], scalings: dict[str, float]) -> dict[str, Tensor]:
    """The peft model's full state dict (`state`, as `get_model_state_dict` gathers it) as the base model's
    full weights with each adapter merged in (W + B A * alpha / r), under the base model's names."""
    merged = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        if name in scalings:
            stem = name.removesuffix("base_layer.weight")
            a, b = state[f"{stem}lora_A.{ADAPTER}.weight"], state[f"{stem}lora_B.{ADAPTER}.weight"]
            tensor = tensor + (b.to(tensor.dtype) @ a.to(tensor.dtype)) * scalings[name]
        merged[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = tensor
    return merged


def adapter_state_from_full(peft_model: Any, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapters under peft's file names, picked from the peft model's full state dict `state`."""
    return dict(get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=ADAPTER))


def load_adapters(peft_model: Any, directory: Path, device: torch.device) -> None:
    """Copy the adapters `save_pretrained` wrote to `directory` into `peft_model`."""
    saved = load_file(directory / "adapter_model.safetensors", device=str(device))
    result = set_peft_model_state_dict(peft_model, saved, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise ConfigError(f"the adapters in {directory} do not fit this model (were backend.rank or "
                          f"backend.target_modules changed?): unexpected {result.unexpected_keys[:3]}, "
                          f"missing {missing[:3]}")


def merge_saved_adapters(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """`base` with the adapters saved in `directory` merged into its weights (a plain transformers model)."""
    with _quiet_peft():
        return PeftModel.from_pretrained(base, str(directory)).merge_and_unload()


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft still asks transformers 5 for the deprecated `is_gradient_checkpointing`: hide that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield
