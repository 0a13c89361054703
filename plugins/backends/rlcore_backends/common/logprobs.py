"""Per-token logprobs and entropy of responses from a causal LM, shared by the rollout and the trainer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from rlcore_backends.common.vision import vision_inputs


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at 0 as it would alone."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def distinct_rows(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows that repeat one (ids, mask) row, found once: the first row of each distinct one (in `torch.unique`'s
    order) and, for every row, the index of its distinct row."""
    distinct, inverse = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)
    first = torch.empty(len(distinct), dtype=torch.long, device=ids.device).scatter_(
        0, inverse, torch.arange(len(ids), device=ids.device))
    return first, inverse


def response_logits(model: Any, ids: Tensor, mask: Tensor, response_width: int, temperature: float,
                    multimodal: list[dict[str, Tensor]] | None = None) -> Tensor:
    """Float32 logits / temperature [b, r, V] at the positions that predict the last `response_width` ids.

    Only those positions go through the LM head (`logits_to_keep`), which saves the [b, P, V] prompt logits.
    `multimodal` (one dict of vision inputs per row) goes to a vision-language model, which then computes
    its own (3-D) position ids instead of the text positions.
    """
    vision = vision_inputs(model, ids, multimodal) if multimodal else {}
    positions = {} if vision else {"position_ids": position_ids(mask)}
    out = model(input_ids=ids, attention_mask=mask, **positions, **vision,
                logits_to_keep=response_width + 1, use_cache=False)
    return out.logits[:, :-1].float() / temperature


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log_softmax(logits) at `tokens`, without materialising the full log-softmax."""
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


# ---- chunked LM head: logprobs and entropy without the [tokens, vocab] logits ----------------------------

TILE_ROWS = 4096
"""Rows (tokens) per tile of `head_logprobs`."""
TILE_COLUMNS = 2048
"""Vocabulary entries per tile of `head_logprobs`: with up to 4096 rows a tile's logits are 32 MiB in float32,
and each matmul has the whole hidden size as its inner dimension and >= 2048 outputs a side, which keeps a
CPU's GEMM near its peak (row chunks of a few dozen rows against the whole vocabulary run at a third of it)."""

PLAIN_HEAD_MODELS = frozenset({"qwen2", "qwen3", "llama", "mistral"})
"""transformers causal LMs whose logits are exactly `lm_head(last_hidden_state)` (no scaling or soft-capping)."""


def _tiles(rows: int, vocab: int, tile_rows: int, tile_columns: int) -> Iterator[tuple[slice, slice]]:
    """(row slice, vocabulary slice) of every tile, vocabulary innermost."""
    for r in range(0, rows, tile_rows):
        for v in range(0, vocab, tile_columns):
            yield slice(r, r + tile_rows), slice(v, v + tile_columns)


def _tile_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, columns: slice,
                 temperature: float) -> Tensor:
    """Float32 logits / temperature of `hidden` rows against the vocabulary entries in `columns`."""
    z = torch.nn.functional.linear(hidden, weight[columns].to(hidden.dtype),
                                   None if bias is None else bias[columns].to(hidden.dtype)).float()
    return z.div_(temperature) if temperature != 1.0 else z


def _in_tile(tokens: Tensor, columns: slice, width: int) -> tuple[Tensor, Tensor]:
    """Which rows' tokens fall in the vocabulary slice `columns` (of `width` entries), and their offsets there."""
    offset = tokens - columns.start
    return (offset >= 0) & (offset < width), offset.clamp(0, width - 1)


class _HeadLogprobs(torch.autograd.Function):
    """log_softmax(h @ W.T / T) at `tokens` and the entropy of softmax(h @ W.T / T), tile by tile.

    The logits are computed in [rows x vocabulary] tiles (`_tiles`); the forward keeps a running max, sum of
    exponentials and sum of exponential-weighted logits per row (the online softmax), so only [N] results
    survive; the backward recomputes each tile's logits, or with `keep` takes them from the forward (one
    float32 [N, V] worth of tiles held, a quarter of the LM head's FLOPs saved), and writes that tile's slice
    of the weight gradient directly. The softmax and logit gradients of the plain path never exist.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                temperature: float, tile_rows: int, tile_columns: int, keep: bool) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        ctx.kept = []
        running_max = hidden.new_full((n,), float("-inf"), dtype=torch.float32)
        exp_sum = torch.zeros_like(running_max)  # sum of exp(z - running_max)
        weighted = torch.zeros_like(running_max)  # sum of exp(z - running_max) * z
        picked = torch.zeros_like(running_max)  # z at the token
        for rows, columns in _tiles(n, weight.shape[0], tile_rows, tile_columns):
            z = _tile_logits(hidden[rows], weight, bias, columns, temperature)
            old_max = running_max[rows]
            new_max = torch.maximum(old_max, z.amax(-1))
            rescale = torch.exp(old_max - new_max)
            e = torch.exp(z - new_max[:, None])
            exp_sum[rows] = exp_sum[rows] * rescale + e.sum(-1)
            weighted[rows] = weighted[rows] * rescale + (e.mul_(z)).sum(-1)
            running_max[rows] = new_max
            inside, offset = _in_tile(tokens[rows], columns, z.shape[1])
            picked[rows] = torch.where(inside, z.gather(-1, offset[:, None]).squeeze(-1), picked[rows])
            if keep:
                ctx.kept.append(z)
        lse = running_max + torch.log(exp_sum)
        entropy = lse - weighted / exp_sum
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, entropy)
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not zeros to multiply
        ctx.tile = temperature, tile_rows, tile_columns
        return picked - lse, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: Tensor | None, grad_entropy: Tensor | None) -> tuple[Any, ...]:
        hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        temperature, tile_rows, tile_columns = ctx.tile
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        # dz = (onehot(token) - p) g_lp / T  -  p (z - lse + H) g_H / T  (d logprob / dz and dH / dz)
        g_lp = None if grad_logprobs is None else grad_logprobs.float() / temperature
        g_h = None if grad_entropy is None else grad_entropy.float() / temperature
        shift = lse - entropy
        kept, ctx.kept = ctx.kept[::-1], []  # consumed (overwritten): a second backward recomputes
        for rows, columns in _tiles(hidden.shape[0], weight.shape[0], tile_rows, tile_columns):
            h = hidden[rows]
            z = kept.pop() if kept else _tile_logits(h, weight, bias, columns, temperature)
            p = torch.sub(z, lse[rows, None]).exp_()
            if g_h is not None:  # the negated coefficient of p, in z's memory
                coefficient = z.sub_(shift[rows, None]).mul_(-g_h[rows, None])
                if g_lp is not None:
                    coefficient.sub_(g_lp[rows, None])
                dz = p.mul_(coefficient)
            else:
                dz = p.mul_(-g_lp[rows, None])
            if g_lp is not None:
                inside, offset = _in_tile(tokens[rows], columns, dz.shape[1])
                at = inside.nonzero().squeeze(-1)
                dz.index_put_((at, offset[at]), g_lp[rows][at], accumulate=True)
            dz = dz.to(hidden.dtype)
            w = weight[columns].to(dz.dtype)
            if grad_hidden is not None:
                grad_hidden[rows].addmm_(dz, w)
            if grad_weight is not None:
                grad_weight[columns].addmm_(dz.T, h.to(dz.dtype))
            if grad_bias is not None:
                grad_bias[columns].add_(dz.sum(0).to(bias.dtype))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def head_logprobs(hidden: Tensor, head: torch.nn.Linear, tokens: Tensor, temperature: float,
                  tile_rows: int = TILE_ROWS, tile_columns: int = TILE_COLUMNS, keep_logits_mib: float = 0
                  ) -> tuple[Tensor, Tensor]:
    """Float32 (logprobs, entropy), each shaped like `tokens`, of `head(hidden) / temperature` [..., V] at
    `tokens`, computed in [tile_rows x tile_columns] tiles of logits (see `_HeadLogprobs`). When a backward
    will follow and the float32 logits take at most `keep_logits_mib` MiB, the tiles are kept for it."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = (torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
            and flat.shape[0] * head.weight.shape[0] * 4 <= keep_logits_mib * 2**20)
    logprobs, entropy = _HeadLogprobs.apply(flat, head.weight, head.bias, tokens.reshape(-1), float(temperature),
                                            tile_rows, tile_columns, keep)
    return logprobs.view(tokens.shape), entropy.view(tokens.shape)


def plain_head(model: Any) -> torch.nn.Linear | None:
    """The LM head when `response_logprobs` may skip the full logits: a plain, unsharded, un-wrapped transformers
    model of a `PLAIN_HEAD_MODELS` type, not under autocast; None otherwise (the caller takes the logits path)."""
    from transformers import PreTrainedModel

    config = getattr(model, "config", None)
    if (not isinstance(model, PreTrainedModel) or getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS
            or hasattr(model, "unshard")  # FSDP2: the root's parameters are gathered by its own forward
            or any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))):
        return None
    device = getattr(model, "device", torch.device("cpu"))
    if torch.is_autocast_enabled(device.type):
        return None
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if type(head) is not torch.nn.Linear or decoder is None or decoder is model:
        return None
    return head


def response_logprobs(model: Any, ids: Tensor, mask: Tensor, response_ids: Tensor, temperature: float,
                      multimodal: list[dict[str, Tensor]] | None = None, entropy_grad: bool = False,
                      keep_logits_mib: float = 0, share_prompts: bool = True) -> tuple[Tensor, Tensor]:
    """Float32 (logprobs, entropy) [b, r] of `response_ids` (the last r columns of `ids`) under logits / temperature.

    For a plain text model (`plain_head`) the decoder's hidden states go through the LM head in chunks
    (`head_logprobs`, which keeps them for the backward when they fit in `keep_logits_mib`). Otherwise
    `response_logits`. The entropy carries a gradient only with `entropy_grad`. With `share_prompts`, rows
    that repeat a prompt (a group's n samples) run it through the decoder once (`shared_prompt_hidden`).
    """
    head = None if multimodal else plain_head(model)
    width = response_ids.shape[1]
    if head is None:
        logits = response_logits(model, ids, mask, width, temperature, multimodal)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = token_entropy(logits)
        return token_logprobs(logits, response_ids), entropy
    decoder = model.get_decoder()
    hidden = shared_prompt_hidden(decoder, ids, mask, width) if share_prompts else None
    if hidden is None:
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                         use_cache=False).last_hidden_state[:, -width - 1:-1]
    logprobs, entropy = head_logprobs(hidden, head, response_ids, temperature, keep_logits_mib=keep_logits_mib)
    return logprobs, entropy if entropy_grad else entropy.detach()


def shared_prompt_hidden(decoder: Any, ids: Tensor, mask: Tensor, width: int) -> Tensor | None:
    """The decoder's hidden states [b, width, H] at the positions that predict the last `width` ids, with
    each distinct prompt (the first P - width columns of `ids` and `mask`) run once: its keys and values are
    cached, indexed out to every row that repeats it, and the responses run on top. The gradient of every
    row flows back into the one prompt pass. None when no prompt repeats or the decoder cannot keep a
    cache with gradients (gradient checkpointing drops it); the caller then runs the rows whole.

    The same sums as one pass over each whole row, in another order: equal to float32 rounding."""
    from transformers import DynamicCache

    prompt_ids, prompt_mask = ids[:, :-width], mask[:, :-width]
    if prompt_ids.shape[1] == 0 or getattr(decoder, "gradient_checkpointing", False):
        return None
    first, inverse = distinct_rows(prompt_ids, prompt_mask)
    if len(first) == len(ids):
        return None
    positions = position_ids(mask)
    cache = DynamicCache(config=decoder.config)
    last = decoder(input_ids=prompt_ids[first], attention_mask=prompt_mask[first],
                   position_ids=positions[first, :-width], past_key_values=cache,
                   use_cache=True).last_hidden_state[:, -1:][inverse]
    if width == 1:
        return last
    cache.batch_select_indices(inverse)
    rest = decoder(input_ids=ids[:, -width:-1], attention_mask=mask[:, :-1], position_ids=positions[:, -width:-1],
                   past_key_values=cache, use_cache=True).last_hidden_state
    return torch.cat([last, rest], dim=1)
