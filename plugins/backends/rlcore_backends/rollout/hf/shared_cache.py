"""The lean decoder's key/value cache: each distinct prompt's keys and values once, each row's generated ones
in a buffer with room for the whole completion, and one query's attention over both.

The n samples of a group start from one prompt. Copying the prompt's prefill cache to every row (what
`generate` does) makes every decode step read the prompt's keys and values n times over; at 4 samples of
~250-token prompts that is most of what a step's attention reads. Here a layer's attention runs twice: the queries
of all rows of one prompt over that prompt's keys as one attention call (the prompts batched, their left
padding masked out), and each row's queries over its own generated keys; the two results are added weighted by
their log-sum-exp (what flash attention does between blocks). That is SDPA's attention over the concatenated
cache, to float rounding. On a CPU both calls are torch's flash-attention kernel, which returns the
log-sum-exp (`FLASH`; the public SDPA does not); elsewhere they are written out (`math_attention`). Attention may compute in a wider type than the model (float64 for
`bfloat16_matched`, whose rounding-order differences must stay far below float32's): the cache is then kept in
that type, so a step converts only its own keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
"""SDPA's CPU kernel: (output, log-sum-exp) for query [B, H, L, E], keys and values [B, H, S, E]."""


def math_attention(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None, scale: float
                   ) -> tuple[Tensor, Tensor]:
    """What `FLASH` returns, written out: softmax(query keys^T * scale + bias) values in the query's dtype, and
    the log-sum-exp of the scores [B, H, L], both with the softmax in float32 at least (as flash kernels
    accumulate)."""
    wide = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query, keys.transpose(-1, -2)).to(wide).mul_(scale)
    if bias is not None:
        scores = scores + bias.to(wide)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(values.dtype), values), lse


def attention(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None, scale: float
              ) -> tuple[Tensor, Tensor]:
    """(output, log-sum-exp) of one attention call: `FLASH` on a CPU, `math_attention` elsewhere."""
    if query.device.type == "cpu":
        out, lse = FLASH(query, keys, values, 0.0, False, attn_mask=bias, scale=scale)[:2]
        return out, lse
    return math_attention(query, keys, values, bias, scale)


class SharedPromptCache:
    """Keys and values of a decode whose rows may share prompts. `prompts` holds each layer's prefill keys and
    values of the distinct prompts [prompts, kv_heads, P, head_dim], `prompt_mask` [prompts, P] their real (not
    padding) positions, `prompt_of` [rows] each row's prompt, and `room` the most tokens a row generates;
    attention computes in `dtype` (the prompts' own where None) and returns the query's dtype."""

    def __init__(self, prompts: Sequence[tuple[Tensor, Tensor]], prompt_mask: Tensor, prompt_of: Tensor,
                 room: int, dtype: torch.dtype | None = None) -> None:
        self.prompts = [(k.to(dtype), v.to(dtype)) for k, v in prompts] if dtype else list(prompts)
        rows = len(prompt_of)
        self.keys = [k.new_empty(rows, k.shape[1], room, k.shape[3]) for k, _ in self.prompts]
        self.values = [v.new_empty(rows, v.shape[1], room, v.shape[3]) for _, v in self.prompts]
        self.lengths = [0] * len(self.prompts)
        """Per layer, the positions each row has generated into so far."""
        dtype = self.prompts[0][0].dtype
        self.prompt_bias = torch.zeros(prompt_mask.shape, dtype=dtype, device=prompt_mask.device).masked_fill_(
            ~prompt_mask.bool(), float("-inf"))[:, None, None, :]
        self._place(prompt_of)

    def _place(self, prompt_of: Tensor) -> None:
        """Keep the prompts the rows use, numbered in the order of their first row, and lay the rows out in
        slots, `width` per prompt (a prompt's rows in order, then empty slots), for the attention calls over
        the prompts; `dense` when every slot holds its row, as when each prompt's rows come together (no copy
        needed)."""
        rows, arange = len(prompt_of), torch.arange(len(prompt_of), device=prompt_of.device)
        first_row = torch.full((len(self.prompt_bias),), rows, device=prompt_of.device).scatter_reduce_(
            0, prompt_of, arange, "amin")
        used = torch.argsort(first_row)[:int((first_row < rows).sum())]
        if not torch.equal(used, torch.arange(len(self.prompt_bias), device=used.device)):
            self.prompts = [(k[used], v[used]) for k, v in self.prompts]
            self.prompt_bias = self.prompt_bias[used]
            renumber = torch.empty_like(first_row).index_copy_(0, used, torch.arange(len(used), device=used.device))
            prompt_of = renumber[prompt_of]
        self.prompt_of = prompt_of
        prompts = len(self.prompt_bias)
        counts = torch.bincount(prompt_of, minlength=prompts)
        self.width = int(counts.max())
        order = torch.argsort(prompt_of, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(prompt_of)
        rank[order] = arange - starts[prompt_of[order]]
        self.slots = prompt_of * self.width + rank
        self.dense = rows == prompts * self.width and bool(torch.equal(self.slots, arange))

    def select(self, keep: Tensor) -> None:
        """Keep only the rows `keep` (the others finished), in that order."""
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self._place(self.prompt_of[keep])

    def _by_prompt(self, x: Tensor) -> Tensor:
        """[rows, kv, g, e] -> [prompts, kv, width * g, e]: each prompt's rows side by side (empty slots zero)."""
        rows, kv, g, e = x.shape
        if not self.dense:
            x = x.new_zeros(len(self.prompt_bias) * self.width, kv, g, e).index_copy_(0, self.slots, x)
        return x.reshape(-1, self.width, kv, g, e).transpose(1, 2).reshape(-1, kv, self.width * g, e)

    def _by_row(self, x: Tensor, g: int) -> Tensor:
        """The inverse of `_by_prompt`: [prompts, kv, width * g, e] -> [rows, kv, g, e]."""
        prompts, kv, _, e = x.shape
        x = x.reshape(prompts, kv, self.width, g, e).transpose(1, 2).reshape(prompts * self.width, kv, g, e)
        return x if self.dense else x[self.slots]

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """Add this step's `key` and `value` [rows, kv, head_dim] to `layer`'s cache and return the attention
        of `query` [rows, kv, g, head_dim] (the g query heads of each key/value head together) over the row's
        prompt and everything it generated, this token included: [rows, kv, g, head_dim]."""
        at = self.lengths[layer]
        if at >= self.keys[layer].shape[2]:
            raise RuntimeError("SharedPromptCache: more positions than reserved")
        keys, values = self.keys[layer], self.values[layer]
        out_dtype, query = query.dtype, query.to(keys.dtype)
        keys[:, :, at] = key
        values[:, :, at] = value
        self.lengths[layer] = at + 1
        prompt_keys, prompt_values = self.prompts[layer]
        g = query.shape[2]
        prompt_out, prompt_lse = attention(self._by_prompt(query), prompt_keys, prompt_values, self.prompt_bias, scale)
        prompt_out, prompt_lse = self._by_row(prompt_out, g), self._by_row(prompt_lse[..., None], g)
        own_out, own_lse = attention(query, keys[:, :, :at + 1], values[:, :, :at + 1], None, scale)
        # the merge in float32 at least, so a bfloat16 model rounds once, as one attention call does
        wide = torch.promote_types(prompt_out.dtype, torch.float32)
        prompt_lse, own_lse = prompt_lse.to(wide), own_lse[..., None].to(wide)
        top = torch.maximum(prompt_lse, own_lse)
        prompt_weight, own_weight = (prompt_lse - top).exp_(), (own_lse - top).exp_()
        out = (prompt_out.to(wide) * prompt_weight).add_(own_out.to(wide) * own_weight)
        return out.div_(prompt_weight.add_(own_weight)).to(out_dtype)
