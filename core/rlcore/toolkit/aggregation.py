"""Loss aggregation: per-token values [b, R] -> one scalar, divided by GLOBAL counts (`LossNorm`).

Every mode is a plain sum over this micro-batch's tokens or sequences divided by a count of the whole
mini-batch, so summing the results over micro-batches and data-parallel ranks gives exactly the loss
(and gradient) of the unsplit mini-batch, whatever the split and however each part is padded.
"""

from __future__ import annotations

from torch import Tensor

from rlcore.types import LossNorm

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
"""token-mean: mean over all loss tokens (DAPO). seq-mean-token-sum: mean over sequences of the token sum.
seq-mean-token-mean: mean over sequences of the token mean (GRPO paper). seq-mean-token-sum-norm: token
sum over sequences divided by sequences x max response length, a constant (Dr.GRPO: no length bias)."""


def masked(values: Tensor, mask: Tensor) -> Tensor:
    """`values` with every position outside `mask` set to exactly 0 (also where it is inf or NaN)."""
    return values.where(mask > 0, values.new_zeros(()))


def aggregate(values: Tensor, mask: Tensor, mode: str, norm: LossNorm) -> Tensor:
    """This micro-batch's share of the mini-batch aggregate of `values` under `mode`."""
    token_sum = masked(values, mask).sum(-1)
    sequences = max(norm.sequences, 1.0)
    if mode == "token-mean":
        return token_sum.sum() / max(norm.tokens, 1.0)
    if mode == "seq-mean-token-sum":
        return token_sum.sum() / sequences
    if mode == "seq-mean-token-mean":
        return (token_sum / mask.sum(-1).clamp(min=1)).sum() / sequences
    if mode == "seq-mean-token-sum-norm":
        return token_sum.sum() / (sequences * max(norm.max_response_length, 1))
    raise ValueError(f"loss aggregation {mode!r} is unknown; choose one of {', '.join(AGG_MODES)}")


def token_mean(values: Tensor, mask: Tensor, norm: LossNorm) -> Tensor:
    """Summable token mean of a metric, detached."""
    return aggregate(values.detach(), mask, "token-mean", norm)
