"""Hugging Face <-> Megatron-core weight mapping for Qwen2 / Qwen3 / Llama models (pure tensor code).

A Megatron rank (tp_rank, pp_rank) holds the layers of its pipeline stage with their tensor-parallel
slice, under GPTModel's own parameter names (local layer spec, layers numbered from 0 on each stage):

| Hugging Face | Megatron (per rank) | split |
|---|---|---|
| `model.embed_tokens.weight` | `embedding.word_embeddings.weight` | vocab rows, padded to a multiple of tp |
| `...self_attn.{q,k,v}_proj.*` | `...self_attention.linear_qkv.*` | per KV group [q heads; k; v]; groups split |
| `...self_attn.o_proj.weight` | `...self_attention.linear_proj.weight` | input columns |
| `...self_attn.{q,k}_norm.weight` (Qwen3) | `...self_attention.{q,k}_layernorm.weight` | replicated |
| `...mlp.{gate,up}_proj.weight` | `...mlp.linear_fc1.weight` | [gate slice; up slice] per rank |
| `...mlp.down_proj.weight` | `...mlp.linear_fc2.weight` | input columns |
| `...input_layernorm.weight` | `...input_layernorm.weight` | replicated |
| `...post_attention_layernorm.weight` | `...pre_mlp_layernorm.weight` | replicated |
| `model.norm.weight` | `decoder.final_layernorm.weight` | replicated, last stage |
| `lm_head.weight` | `output_layer.weight` | vocab rows; tied: the last stage of a pipeline keeps a copy |

Converting HF -> Megatron -> HF returns bit-identical tensors (slicing and concatenation only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcore.errors import ConfigError

SUPPORTED = ("qwen2", "qwen3", "llama")
"""transformers `model_type`s with RMSNorm, SwiGLU, rotary embeddings and (grouped-query) attention."""


@attrs.frozen
class Layout:
    """A Hugging Face decoder's shapes and how they are cut over `tp` x `pp` Megatron ranks."""

    tp: int
    pp: int
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @property
    def padded_vocab(self) -> int:
        """Vocabulary rounded up to a multiple of tp (the extra rows are zero and masked out of the softmax)."""
        return -(-self.vocab // self.tp) * self.tp

    @property
    def vocab_shard(self) -> int:
        return self.padded_vocab // self.tp

    @property
    def layers_per_stage(self) -> int:
        return self.layers // self.pp

    def stage_layers(self, pp_rank: int) -> range:
        """Global indices of the layers on pipeline stage `pp_rank`."""
        return range(pp_rank * self.layers_per_stage, (pp_rank + 1) * self.layers_per_stage)

    def ranks(self) -> Iterator[tuple[int, int]]:
        """Every (tp_rank, pp_rank)."""
        return ((t, p) for p in range(self.pp) for t in range(self.tp))

    @classmethod
    def from_hf_config(cls, config: Any, tp: int, pp: int) -> Layout:
        """The layout of a transformers config at tp x pp; ConfigError names what does not fit."""
        kind = getattr(config, "model_type", "?")
        if kind not in SUPPORTED:
            raise ConfigError(f"backend megatron: model_type {kind!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED)} (RMSNorm, SwiGLU, rotary attention)")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ConfigError(f"backend megatron: hidden_act {config.hidden_act!r} is not supported (only silu)")
        if getattr(config, "mlp_bias", False) or (kind != "qwen2" and getattr(config, "attention_bias", False)):
            raise ConfigError("backend megatron: attention_bias / mlp_bias on every projection is not supported")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layout = cls(
            tp=tp, pp=pp, layers=config.num_hidden_layers, hidden=config.hidden_size,
            ffn=config.intermediate_size, heads=heads, kv_heads=kv_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3")
        for what, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                            ("intermediate_size", layout.ffn)):
            if count % tp:
                raise ConfigError(f"backend.tp={tp} must divide the model's {what} ({count})")
        if layout.layers % pp:
            raise ConfigError(f"backend.pp={pp} must divide the model's num_hidden_layers ({layout.layers})")
        return layout


def _hf_layer(i: int) -> str:
    return f"model.layers.{i}."


def _mg_layer(i: int) -> str:
    return f"decoder.layers.{i}."


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def _pack_qkv(layout: Layout, q: Tensor, k: Tensor, v: Tensor, tp_rank: int) -> Tensor:
    """This rank's rows of Megatron's fused QKV: for each of its KV groups, that group's q heads, k, v."""
    groups = layout.kv_heads
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)], 1)
    return fused.chunk(layout.tp)[tp_rank].reshape(-1, *rest).clone()


def _unpack_qkv(layout: Layout, shards: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `_pack_qkv` over all tp ranks' shards."""
    per_group = (layout.heads // layout.kv_heads + 2) * layout.head_dim
    rest = shards[0].shape[1:]
    fused = torch.cat([s.reshape(-1, per_group, *rest) for s in shards])
    q_rows = per_group - 2 * layout.head_dim
    q, k, v = fused.split([q_rows, layout.head_dim, layout.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def shard_from_hf(layout: Layout, read: Callable[[str], Tensor], tp_rank: int, pp_rank: int) -> dict[str, Tensor]:
    """The Megatron state of rank (tp_rank, pp_rank) from Hugging Face tensors fetched by name with `read`."""
    tp, out = layout.tp, {}
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    if first:
        embed = _pad_rows(read("model.embed_tokens.weight"), layout.padded_vocab)
        out["embedding.word_embeddings.weight"] = embed.chunk(tp)[tp_rank].clone()
    for local, i in enumerate(layout.stage_layers(pp_rank)):
        h, m = _hf_layer(i), _mg_layer(local)
        attn = h + "self_attn."
        out[m + "input_layernorm.weight"] = read(h + "input_layernorm.weight")
        out[m + "self_attention.linear_qkv.weight"] = _pack_qkv(
            layout, *(read(f"{attn}{x}_proj.weight") for x in "qkv"), tp_rank)
        if layout.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = _pack_qkv(
                layout, *(read(f"{attn}{x}_proj.bias") for x in "qkv"), tp_rank)
        if layout.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = read(attn + "q_norm.weight")
            out[m + "self_attention.k_layernorm.weight"] = read(attn + "k_norm.weight")
        out[m + "self_attention.linear_proj.weight"] = read(attn + "o_proj.weight").chunk(tp, 1)[tp_rank].clone()
        out[m + "pre_mlp_layernorm.weight"] = read(h + "post_attention_layernorm.weight")
        gate, up = read(h + "mlp.gate_proj.weight"), read(h + "mlp.up_proj.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
        out[m + "mlp.linear_fc2.weight"] = read(h + "mlp.down_proj.weight").chunk(tp, 1)[tp_rank].clone()
    if last:
        out["decoder.final_layernorm.weight"] = read("model.norm.weight")
        if not layout.tied or layout.pp > 1:
            head = read("model.embed_tokens.weight" if layout.tied else "lm_head.weight")
            out["output_layer.weight"] = _pad_rows(head, layout.padded_vocab).chunk(tp)[tp_rank].clone()
    return out


def hf_from_shards(layout: Layout, shards: Mapping[tuple[int, int], Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Hugging Face tensors from every rank's Megatron state, keyed by (tp_rank, pp_rank); inverse of
    `shard_from_hf`. A tied model gets no `lm_head.weight` (transformers ties it on load)."""
    missing = [r for r in layout.ranks() if r not in shards]
    if missing:
        raise ValueError(f"Megatron shards of ranks (tp, pp) {missing} are missing")
    tp = layout.tp

    def cat(pp_rank: int, name: str, dim: int = 0) -> Tensor:
        return torch.cat([shards[t, pp_rank][name] for t in range(tp)], dim)

    def unpadded(t: Tensor) -> Tensor:
        return t[:layout.vocab].clone() if t.shape[0] > layout.vocab else t  # own storage, for safetensors

    out: dict[str, Tensor] = {"model.embed_tokens.weight": unpadded(cat(0, "embedding.word_embeddings.weight"))}
    for p in range(layout.pp):
        for local, i in enumerate(layout.stage_layers(p)):
            h, m = _hf_layer(i), _mg_layer(local)
            attn = h + "self_attn."
            one = shards[0, p]
            out[h + "input_layernorm.weight"] = one[m + "input_layernorm.weight"]
            qkv = _unpack_qkv(layout, [shards[t, p][m + "self_attention.linear_qkv.weight"] for t in range(tp)])
            out.update({f"{attn}{x}_proj.weight": w for x, w in zip("qkv", qkv, strict=True)})
            if layout.qkv_bias:
                qkv = _unpack_qkv(layout, [shards[t, p][m + "self_attention.linear_qkv.bias"] for t in range(tp)])
                out.update({f"{attn}{x}_proj.bias": b for x, b in zip("qkv", qkv, strict=True)})
            if layout.qk_norm:
                out[attn + "q_norm.weight"] = one[m + "self_attention.q_layernorm.weight"]
                out[attn + "k_norm.weight"] = one[m + "self_attention.k_layernorm.weight"]
            out[attn + "o_proj.weight"] = cat(p, m + "self_attention.linear_proj.weight", 1)
            out[h + "post_attention_layernorm.weight"] = one[m + "pre_mlp_layernorm.weight"]
            halves = [shards[t, p][m + "mlp.linear_fc1.weight"].chunk(2) for t in range(tp)]
            out[h + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in halves])
            out[h + "mlp.up_proj.weight"] = torch.cat([u for _, u in halves])
            out[h + "mlp.down_proj.weight"] = cat(p, m + "mlp.linear_fc2.weight", 1)
    last = layout.pp - 1
    out["model.norm.weight"] = shards[0, last]["decoder.final_layernorm.weight"]
    if not layout.tied:
        out["lm_head.weight"] = unpadded(cat(last, "output_layer.weight"))
    return out
