"""Building Megatron-core's GPTModel from a transformers Qwen2 / Qwen3 / Llama config, and loading its weights.

Must run after `torch.distributed` and `parallel_state.initialize_model_parallel` (the model is built for
this rank's tensor slice and pipeline stage). Parameters are float32 master weights; bfloat16 compute
runs under Megatron's CUDA autocast.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rlcore.errors import ConfigError
from rlcore_backends.update.megatron.convert import Layout

TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
"""Transformer Engine layers fuse the pre-attention and pre-MLP norms into the next linear layer."""


def check_installed() -> None:
    """A ConfigError naming the extra that installs Megatron-core, unless it is installed (found, not imported:
    only the workers import it)."""
    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError("backend megatron needs Megatron-core: pip install 'rlcore-backends[megatron]'")


def check_attention(hf_config: Any) -> None:
    """A ConfigError for attention GPTModel's local layers do not implement (sliding windows)."""
    if getattr(hf_config, "use_sliding_window", False):
        raise ConfigError("backend megatron: sliding-window attention is not supported; use --backend fsdp")


def rope_settings(hf_config: Any) -> tuple[float, float | None]:
    """(rotary base, Llama-3 scaling factor or None) from a transformers config (4.x or 5.x field names)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    megatron_llama3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind == "llama3" and all(float(params.get(k, v)) == v for k, v in megatron_llama3.items()):
        return theta, float(params["factor"])
    raise ConfigError(f"backend megatron: rope scaling {params} is not supported (only none, and llama3 with "
                      "low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192)")


def transformer_config(hf_config: Any, layout: Layout, *, sequence_parallel: bool, recompute: bool,
                       bf16_autocast: bool, on_cpu: bool) -> Any:
    """Megatron's TransformerConfig for the transformers model at the layout's tp x pp. With `bf16_autocast`
    Megatron's schedules run forward passes under CUDA bfloat16 autocast (float32 master weights)."""
    from megatron.core.transformer import TransformerConfig

    check_attention(hf_config)
    return TransformerConfig(
        num_layers=layout.layers, hidden_size=layout.hidden, ffn_hidden_size=layout.ffn,
        num_attention_heads=layout.heads, num_query_groups=layout.kv_heads, kv_channels=layout.head_dim,
        normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=layout.qkv_bias,
        qk_layernorm=layout.qk_norm, hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        sequence_parallel=sequence_parallel, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        enable_autocast=bf16_autocast, autocast_dtype=torch.bfloat16,
        use_cpu_initialization=on_cpu, calculate_per_token_loss=True,
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",  # (no MoE: the check wants alltoall)
        recompute_granularity="full" if recompute else None, recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None)


def build_gpt(hf_config: Any, layout: Layout, config: Any, transformer_engine: bool) -> Any:
    """This rank's GPTModel (its pipeline stage, its tensor slice), randomly initialised (Megatron sets the
    tensor-parallel attributes of weights only when it initialises them)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if transformer_engine:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=layout.qk_norm)
    else:
        spec = specs.get_gpt_layer_local_spec(qk_layernorm=layout.qk_norm, normalization="RMSNorm")
    theta, scaling = rope_settings(hf_config)
    return GPTModel(
        config, spec, vocab_size=layout.padded_vocab, max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True, share_embeddings_and_output_weights=layout.tied, position_embedding_type="rope",
        rotary_base=theta, rope_scaling=scaling is not None, rope_scaling_factor=scaling or 8.0)


def freeze_padding_embedding(model: Any, pad_id: int | None) -> None:
    """Give the padding token's embedding no gradient from lookups, as transformers' `nn.Embedding(padding_idx)`
    does (it matters when the policy samples the padding token). Only on the first pipeline stage."""
    embedding = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if pad_id is None or embedding is None:
        return

    def detach_padding(module: Any, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        keep = args[0] != pad_id  # [b, s]
        if module.reduce_scatter_embeddings:  # sequence parallel: this rank's [s / tp, b] slice
            keep = keep.t().chunk(module.tp_group.size())[module.tp_group.rank()]
        return torch.where(keep.unsqueeze(-1), output, output.detach())

    embedding.register_forward_hook(detach_padding)


def _renamed(name: str, table: Mapping[str, str]) -> str:
    """`name` with a layer-suffix from `table` replaced (decoder layers only)."""
    if name.startswith("decoder.layers."):
        for old, new in table.items():
            if name.endswith(old):
                return name[: -len(old)] + new
    return name


@torch.no_grad()
def load_shard(model: torch.nn.Module, shard: Mapping[str, Tensor], transformer_engine: bool) -> None:
    """Copy a canonical shard (see `convert`) into the model's parameters; every parameter must be given."""
    params = dict(model.named_parameters())
    table = TE_NAMES if transformer_engine else {}
    given = {_renamed(name, table): tensor for name, tensor in shard.items()}
    missing, unexpected = sorted(set(params) - set(given)), sorted(set(given) - set(params))
    if missing or unexpected:
        raise ValueError(f"Megatron shard does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, tensor in given.items():
        if params[name].shape != tensor.shape:
            raise ValueError(f"Megatron shard: {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(params[name].shape)}")
        params[name].copy_(tensor)


def shard_of(model: torch.nn.Module, transformer_engine: bool) -> dict[str, Tensor]:
    """The model's parameters under canonical (local-spec) names, as CPU tensors."""
    table = {fused: local for local, fused in TE_NAMES.items()} if transformer_engine else {}
    return {_renamed(name, table): p.detach().cpu().clone() for name, p in model.named_parameters()}
