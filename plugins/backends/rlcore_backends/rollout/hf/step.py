"""One decode step of a Llama-family decoder (Llama, Qwen2, Qwen3), written out.

Per step, transformers' decoder forward builds the attention mask and position embeddings through its generic
machinery and dispatches attention through its interface, layer by layer: on a CPU that is a tenth of a
SmolLM2 decode step. `DecodeStep` computes the same thing for one new token per row over the decode's cache:
the model's own modules (embedding, norms, rotary embedding, activation) and `Linear` layers, the model
module's `apply_rotary_pos_emb`, and attention as transformers' SDPA path computes a single query under a mask
(the query heads of one key/value head packed together; without padding transformers passes no mask and
`enable_gqa` instead: the same values to float rounding). Each layer's q, k and v projections (and gate and
up) go through one `linears.DecodeLinears` group, so where weights are packed each is one GEMM. Other decoders
(sliding windows, eager attention, `bfloat16_matched`'s own attention, hooks) take transformers' forward."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

FAMILIES = {"LlamaModel": "LlamaDecoderLayer", "Qwen2Model": "Qwen2DecoderLayer", "Qwen3Model": "Qwen3DecoderLayer"}
"""The decoders `DecodeStep` runs, by class name, and their layers' class."""


def supported(decoder: Any) -> bool:
    """Whether `DecodeStep` computes what `decoder`'s forward does: a transformers decoder of a listed family
    with only its own layer class (as many as the config says), every layer's attention full (no sliding
    window) and in SDPA form (eager rounds differently in bfloat16), and no module it replaces carrying a
    hook or a forward of its own."""
    layer_kind = FAMILIES.get(type(decoder).__name__)
    layers = getattr(decoder, "layers", ())
    config = decoder.config
    return (layer_kind is not None and type(decoder).__module__.startswith("transformers.models.")
            and 0 < len(layers) == getattr(config, "num_hidden_layers", -1)
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and all(type(layer).__name__ == layer_kind and getattr(layer.self_attn, "sliding_window", None) is None
                    for layer in layers)
            and not _hooked([decoder, *layers, *(m for layer in layers for m in (layer.self_attn, layer.mlp))]))


def _hooked(modules: Sequence[torch.nn.Module]) -> bool:
    """Whether a forward hook (global or a module's) or an instance `forward` would run in these modules'
    forward, which `DecodeStep` does not call."""
    hooks = torch.nn.modules.module
    return (bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)
            or any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in modules))


def groups(decoder: Any) -> list[list[torch.nn.Linear]]:
    """Per layer, the projections that take the same input: [q, k, v] and [gate, up]."""
    out = []
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [[attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]]
    return out


class DecodeStep:
    """`decoder`'s last hidden state for one new token per row, its keys and values added to `cache` (in place
    where its layers are `decode.ReservedLayer`s); `projections` are the `linears.DecodeLinears` groups of
    `groups(decoder)`, in order."""

    def __init__(self, decoder: Any, projections: Sequence[Callable[[Tensor], tuple[Tensor, ...]]]) -> None:
        self.decoder, self.projections = decoder, projections
        attn = decoder.layers[0].self_attn
        self.heads = decoder.config.num_attention_heads
        self.kv_heads = decoder.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def __call__(self, token: Tensor, position: Tensor, mask: Tensor, cache: DynamicCache) -> Tensor:
        """hidden [rows, H] after the final norm, for `token` [rows] at `position` [rows]; `mask` [rows, L] marks
        the positions each row attends to, this token's included (L: the cache's length after the step)."""
        rows, decoder = len(token), self.decoder
        x = decoder.embed_tokens(token)
        cos, sin = decoder.rotary_emb(x[:, None], position[:, None])
        attend = mask.bool()[:, None, None, :]
        for index, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = self.projections[2 * index](layer.input_layernorm(x))
            q = q.reshape(rows, self.heads, self.head_dim)
            k = k.reshape(rows, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.rotate(q[:, :, None], k[:, :, None], cos, sin)
            keys, values = cache.layers[index].update(k, v.reshape(rows, self.kv_heads, 1, self.head_dim))
            out = torch.nn.functional.scaled_dot_product_attention(
                q.reshape(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim), keys, values,
                attn_mask=attend, scale=attn.scaling)
            x = x + attn.o_proj(out.reshape(rows, self.heads * self.head_dim))
            gate, up = self.projections[2 * index + 1](layer.post_attention_layernorm(x))
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)
        return decoder.norm(x)

