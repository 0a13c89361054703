"""Per-token logprobs and entropy of responses from a causal LM, shared by the rollout and the trainer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at 0 as it would alone."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logits(model: Any, ids: Tensor, mask: Tensor, response_width: int, temperature: float) -> Tensor:
    """Float32 logits / temperature [b, r, V] at the positions that predict the last `response_width` ids.

    Only those positions go through the LM head (`logits_to_keep`), which saves the [b, P, V] prompt logits.
    """
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                logits_to_keep=response_width + 1, use_cache=False)
    return out.logits[:, :-1].float() / temperature


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log_softmax(logits) at `tokens`, without materialising the full log-softmax."""
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
