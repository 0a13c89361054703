"""Dr.GRPO (arXiv 2503.20783): no std normalisation, token sums over a constant length."""

from __future__ import annotations

import math

import pytest
import torch

from rlcore.testing import make_batch
from rlcore.types import LossInputs, LossNorm
from rlcore_algorithms.drgrpo import DrGRPO


def test_advantage_is_reward_minus_group_mean():
    batch = make_batch(groups=1, n=4, response_len=2, lengths=[2, 2, 1, 2], rewards=[1.0, 0.0, 0.0, 0.0])
    adv = DrGRPO(DrGRPO.Options()).advantage(batch)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_loss_matches_paper_objective(norm):
    """J = 1/G sum_i sum_t min(r A, clip(r) A) / L_max with L_max the (constant) generation budget."""
    loss = DrGRPO(DrGRPO.Options()).policy_loss()
    assert loss.agg == "seq-mean-token-sum-norm"
    ratios = [[1.1, 0.9, 1.3], [0.95, 1.0, 1.0]]
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = [0.5, -1.5]
    L = 8
    objective = sum(min(r * adv[i], min(max(r, 0.8), 1.2) * adv[i]) * float(m)
                    for i in range(2) for r, m in zip(ratios[i], mask[i])) / 2 / L
    lp = torch.tensor(ratios, dtype=torch.float64).log().requires_grad_()
    inputs = LossInputs(logprobs=lp, advantages=torch.tensor(adv, dtype=torch.float64)[:, None] * mask,
                        mask=mask.double(), old_logprobs=torch.zeros(2, 3, dtype=torch.float64))
    value, _ = loss(inputs, norm(mask, max_response_length=L))
    assert value.item() == pytest.approx(-objective)


def test_no_length_bias():
    """A wrong answer's per-token gradient does not shrink with its length (unlike seq-mean-token-mean)."""
    loss = DrGRPO(DrGRPO.Options()).policy_loss()
    grads = []
    for length in (2, 6):
        mask = torch.zeros(1, 6, dtype=torch.float64)
        mask[0, :length] = 1
        lp = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
        loss(LossInputs(logprobs=lp, advantages=-mask, mask=mask), LossNorm(length, 1, 6))[0].backward()
        grads.append(lp.grad[0, 0].item())
    assert grads[0] == pytest.approx(grads[1]) and grads[0] == pytest.approx(1 / 6)
    assert not math.isnan(grads[0])
