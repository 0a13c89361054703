"""Shared helpers for the algorithm tests: global loss counts and a loss call on plain lists."""

from __future__ import annotations

import pytest
import torch

from rlcore.types import LossInputs, LossNorm


def norm_of(mask: torch.Tensor, max_response_length: int | None = None) -> LossNorm:
    """The global counts of a whole mini-batch given its loss mask."""
    return LossNorm(tokens=float(mask.sum()), sequences=float((mask.sum(-1) > 0).sum()),
                    max_response_length=mask.shape[1] if max_response_length is None else max_response_length)


@pytest.fixture
def norm():
    return norm_of


@pytest.fixture
def run_loss():
    """Call `loss` on [b, R] lists; returns (loss, metrics, grad of the current logprobs)."""

    def run(loss, logprobs, advantages, mask=None, old=None, **extra):
        lp = torch.tensor(logprobs, dtype=torch.float64, requires_grad=True)
        m = torch.ones_like(lp) if mask is None else torch.tensor(mask, dtype=torch.float64)
        as_t = lambda x: None if x is None else torch.tensor(x, dtype=torch.float64)  # noqa: E731
        inputs = LossInputs(logprobs=lp, advantages=as_t(advantages), mask=m, old_logprobs=as_t(old),
                            **{k: as_t(v) for k, v in extra.items()})
        value, metrics = loss(inputs, norm_of(m))
        value.backward()
        return value.item(), {k: v.item() for k, v in metrics.items()}, lp.grad

    return run
