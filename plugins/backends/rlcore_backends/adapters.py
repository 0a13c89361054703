"""LoRA adapters with peft: wrapping a model, and its weights as adapters or merged into full weights."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

ADAPTER = "default"
"""peft's name for the one adapter a backend trains."""


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> Any:
    """`model` wrapped by peft with fresh LoRA adapters (B = 0, so the policy starts unchanged); only the
    adapters require grad. `target_modules == ["all-linear"]` adapts every linear layer but the LM head."""
    from peft import LoraConfig, get_peft_model

    targets: Any = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config, adapter_name=ADAPTER)


def adapter_config(peft_model: Any) -> dict[str, Any]:
    """The adapter's peft config as plain JSON data (what `adapter_config.json` holds)."""
    return json.loads(json.dumps(peft_model.peft_config[ADAPTER].to_dict(), default=sorted))


@torch.no_grad()
def adapter_state_dict(peft_model: Any) -> dict[str, Tensor]:
    """The adapter weights under peft's file names (`base_model.model.<module>.lora_A.weight`, ...), as
    `save_pretrained` writes them and vLLM's LoRA loader reads them."""
    from peft import get_peft_model_state_dict

    return {name: t.detach().clone() for name, t in get_peft_model_state_dict(peft_model, adapter_name=ADAPTER).items()}


@torch.no_grad()
def merged_state_dict(peft_model: Any) -> dict[str, Tensor]:
    """Full weights under the base model's names with each adapter's update added (W + B A * alpha / r),
    computed aside: the live model keeps its separate base weights and adapters. Weights without an
    adapter are the frozen base tensors themselves, not copies."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(ADAPTER)
              for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    merged = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        merged[name.replace(".base_layer.", ".")] = tensor + deltas[name] if name in deltas else tensor
    return merged
