"""Per-token logprobs and entropy of responses from a causal LM, shared by the rollout and the trainer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlcore_backends.vision import vision_inputs


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at 0 as it would alone."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


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

CHUNK_ELEMENTS = 1 << 23
"""Logits held at once by `head_logprobs` (rows x vocabulary; 32 MiB in float32)."""

PLAIN_HEAD_MODELS = frozenset({"qwen2", "qwen3", "llama", "mistral"})
"""transformers causal LMs whose logits are exactly `lm_head(last_hidden_state)` (no scaling or soft-capping)."""


class _HeadLogprobs(torch.autograd.Function):
    """log_softmax(h @ W.T / T) at `tokens` and the entropy of softmax(h @ W.T / T), chunk by chunk of rows.

    Forward keeps only [N] results; backward recomputes each chunk's logits, so the [N, V] logits (and their
    float32 copies, softmax and gradients that the autograd graph of the plain path holds) never exist.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                temperature: float, rows: int) -> tuple[Tensor, Tensor]:
        logprobs = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        entropy = torch.empty_like(logprobs)
        lse = torch.empty_like(logprobs)
        for i in range(0, hidden.shape[0], rows):
            z = _chunk_logits(hidden[i:i + rows], weight, bias, temperature)
            lse[i:i + rows] = torch.logsumexp(z, -1)
            probs = torch.exp(z - lse[i:i + rows, None])
            entropy[i:i + rows] = lse[i:i + rows] - (probs * z).sum(-1)
            logprobs[i:i + rows] = z.gather(-1, tokens[i:i + rows, None]).squeeze(-1) - lse[i:i + rows]
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, entropy)
        ctx.temperature, ctx.rows = temperature, rows
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: Tensor | None, grad_entropy: Tensor | None) -> tuple[Any, ...]:
        hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        temperature, rows = ctx.temperature, ctx.rows
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for i in range(0, hidden.shape[0], rows):
            h = hidden[i:i + rows]
            z = _chunk_logits(h, weight, bias, temperature)
            probs = torch.exp(z - lse[i:i + rows, None])
            dz = torch.zeros_like(z)
            if grad_logprobs is not None:  # d logprob / dz = onehot(token) - p
                g = grad_logprobs[i:i + rows, None].float()
                dz.sub_(probs * g).scatter_add_(-1, tokens[i:i + rows, None], g)
            if grad_entropy is not None:  # dH / dz = -p (z - lse + H)
                g = grad_entropy[i:i + rows, None].float()
                dz.sub_(probs * (z - (lse[i:i + rows] - entropy[i:i + rows])[:, None]) * g)
            dz = (dz / temperature).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[i:i + rows] = dz @ weight.to(dz.dtype)
            if grad_weight is not None:
                grad_weight.add_((dz.T @ h).to(weight.dtype))
            if grad_bias is not None:
                grad_bias.add_(dz.sum(0).to(bias.dtype))
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    return torch.nn.functional.linear(hidden, weight.to(hidden.dtype),
                                      None if bias is None else bias.to(hidden.dtype)).float() / temperature


def head_logprobs(hidden: Tensor, head: torch.nn.Linear, tokens: Tensor, temperature: float,
                  chunk_elements: int = CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Float32 (logprobs, entropy), each shaped like `tokens`, of `head(hidden) / temperature` [..., V] at
    `tokens`, computed in chunks of rows that hold at most `chunk_elements` logits (see `_HeadLogprobs`)."""
    rows = max(1, chunk_elements // head.weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy = _HeadLogprobs.apply(flat, head.weight, head.bias, tokens.reshape(-1), float(temperature),
                                            rows)
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
                      multimodal: list[dict[str, Tensor]] | None = None, entropy_grad: bool = False
                      ) -> tuple[Tensor, Tensor]:
    """Float32 (logprobs, entropy) [b, r] of `response_ids` (the last r columns of `ids`) under logits / temperature.

    For a plain text model (`plain_head`) the decoder's hidden states go through the LM head in chunks
    (`head_logprobs`): the [b, r, V] logits are never materialised. Otherwise `response_logits`. The entropy
    carries a gradient only with `entropy_grad`.
    """
    head = None if multimodal else plain_head(model)
    width = response_ids.shape[1]
    if head is None:
        logits = response_logits(model, ids, mask, width, temperature, multimodal)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = token_entropy(logits)
        return token_logprobs(logits, response_ids), entropy
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                 use_cache=False).last_hidden_state[:, -width - 1:-1]
    logprobs, entropy = head_logprobs(hidden, head, response_ids, temperature)
    return logprobs, entropy if entropy_grad else entropy.detach()

