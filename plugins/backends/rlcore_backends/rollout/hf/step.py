"""One decode step of a Llama-family decoder (Llama, Qwen2, Qwen3), written out.

Per step, transformers' decoder forward builds the attention mask and position embeddings through its generic
machinery and dispatches attention through its interface, layer by layer: on a CPU that is a tenth of a
SmolLM2 decode step. `DecodeStep` computes the same thing for one new token per row over a
`shared_cache.SharedPromptCache`: the model's own modules (embedding, norms, rotary embedding, activation) and
`Linear` layers, the model module's `apply_rotary_pos_emb`, and one query's attention over the row's prompt
(stored once per distinct prompt) and its generated tokens, the query heads of one key/value head together
(what transformers' SDPA path computes, to float rounding; in float64 for `bfloat16_matched`, as its
`matched_attention` computes it). Each layer's q, k and v projections (and gate and up) go through one
`linears.DecodeLinears` group, so where weights are packed each is one GEMM (`MatchedLinear`s compute one by one,
as in the model's forward). Other decoders (sliding windows, eager attention, hooks) take transformers'
forward."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rlcore_backends.common import matched
from rlcore_backends.rollout.hf.shared_cache import SharedPromptCache

FAMILIES = {"LlamaModel": "LlamaDecoderLayer", "Qwen2Model": "Qwen2DecoderLayer", "Qwen3Model": "Qwen3DecoderLayer"}
"""The decoders `DecodeStep` runs, by class name, and their layers' class."""
ATTENTION = {"sdpa": None, matched.ATTENTION: torch.float64}
"""The attention implementations `DecodeStep` computes, and the type each computes in (None: the model's)."""


def supported(decoder: Any) -> bool:
    """Whether `DecodeStep` computes what `decoder`'s forward does: a transformers decoder of a listed family
    with only its own layer class (as many as the config says), every layer's attention full (no sliding
    window) and in SDPA or `bfloat16_matched` form (`ATTENTION`; eager rounds differently in bfloat16), and no
    module it replaces carrying a hook or a forward of its own."""
    layer_kind = FAMILIES.get(type(decoder).__name__)
    layers = getattr(decoder, "layers", ())
    config = decoder.config
    return (layer_kind is not None and type(decoder).__module__.startswith("transformers.models.")
            and 0 < len(layers) == getattr(config, "num_hidden_layers", -1)
            and getattr(config, "_attn_implementation", None) in ATTENTION
            and all(type(layer).__name__ == layer_kind and getattr(layer.self_attn, "sliding_window", None) is None
                    for layer in layers)
            and not _hooked([decoder, *layers, *(m for layer in layers for m in (layer.self_attn, layer.mlp))]))


def _hooked(modules: Sequence[torch.nn.Module]) -> bool:
    """Whether a forward hook (global or a module's) or an instance `forward` would run in these modules'
    forward, which `DecodeStep` does not call."""
    hooks = torch.nn.modules.module
    return (bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)
            or any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in modules))


def attention_dtype(decoder: Any) -> torch.dtype | None:
    """The type `decoder`'s attention computes in, where it is not the model's own (`ATTENTION`)."""
    return ATTENTION[decoder.config._attn_implementation]


def groups(decoder: Any) -> list[list[torch.nn.Linear]]:
    """Per layer, the projections that take the same input: [q, k, v] and [gate, up]."""
    out = []
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [[attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]]
    return out


class DecodeStep:
    """`decoder`'s last hidden state for one new token per row, its keys and values added to `cache`;
    `projections` are the `linears.DecodeLinears` groups of `groups(decoder)`, in order."""

    def __init__(self, decoder: Any, projections: Sequence[Callable[[Tensor], tuple[Tensor, ...]]],
                 cache: SharedPromptCache) -> None:
        self.decoder, self.projections, self.cache = decoder, projections, cache
        attn = decoder.layers[0].self_attn
        self.heads = decoder.config.num_attention_heads
        self.kv_heads = decoder.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def select(self, keep: Tensor) -> None:
        """Keep only the rows `keep` (the others finished), in that order."""
        self.cache.select(keep)

    def __call__(self, token: Tensor, position: Tensor, mask: Tensor | None = None) -> Tensor:
        """hidden [rows, H] after the final norm, for `token` [rows] at `position` [rows] (`mask` is the
        cache's to keep: unused)."""
        rows, decoder = len(token), self.decoder
        x = decoder.embed_tokens(token)
        cos, sin = decoder.rotary_emb(x[:, None], position[:, None])
        group = self.heads // self.kv_heads
        for index, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = self.projections[2 * index](layer.input_layernorm(x))
            q = q.reshape(rows, self.heads, self.head_dim)
            k = k.reshape(rows, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.rotate(q[:, :, None], k[:, :, None], cos, sin)
            out = self.cache.attend(index, q.reshape(rows, self.kv_heads, group, self.head_dim), k[:, :, 0],
                                    v.reshape(rows, self.kv_heads, self.head_dim), attn.scaling)
            x = x + attn.o_proj(out.reshape(rows, self.heads * self.head_dim))
            gate, up = self.projections[2 * index + 1](layer.post_attention_layernorm(x))
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)
        return decoder.norm(x)
