"""GSPO against its objective and gradient (arXiv 2507.18071, eqs. 5-7 and 10)."""

from __future__ import annotations

import math

import pytest
import torch

from rlcore_algorithms.gspo import GSPO
from rlcore.toolkit import GSPOLoss


def test_loss_and_gradient_match_the_sequence_objective(run_loss):
    """J = 1/G sum_i min(s_i A_i, clip(s_i, 1-e, 1+e) A_i), s_i = (pi / pi_old)^(1/|y_i|); unclipped,
    grad_theta J = 1/G sum_i s_i A_i 1/|y_i| sum_t grad log pi_t."""
    eps = 0.05
    logp = [[-1.0, -0.8, -0.5], [-0.3, -0.2, 0.0], [-2.0, -1.0, -1.0]]
    old = [[-1.02, -0.81, -0.48], [-0.32, -0.25, 0.0], [-2.3, -1.2, -1.0]]
    mask = [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    adv = [0.8, -1.1, 0.6]
    objective, expected_grad = 0.0, torch.zeros(3, 3, dtype=torch.float64)
    for i in range(3):
        n = sum(mask[i])
        s = math.exp(sum(logp[i][t] - old[i][t] for t in range(n)) / n)
        clipped = min(max(s, 1 - eps), 1 + eps)
        objective += min(s * adv[i], clipped * adv[i]) / 3
        if s * adv[i] <= clipped * adv[i]:  # the unclipped term is the minimum: gradient flows
            expected_grad[i, :n] = -s * adv[i] / n / 3
    loss = GSPOLoss(clip_low=eps, clip_high=eps)
    tokens = [[a * m for m in row] for a, row in zip(adv, mask)]
    value, metrics, grad = run_loss(loss, logp, tokens, mask=mask, old=old)
    assert value == pytest.approx(-objective, rel=1e-9)
    torch.testing.assert_close(grad, expected_grad)
    # only the third sequence is clipped: s = exp((0.3 + 0.2 + 0) / 3) > 1.05 with A > 0; its 3 of 8 tokens
    assert math.exp(0.5 / 3) > 1 + eps and expected_grad[2].abs().sum() == 0
    assert metrics["clip_frac"] == pytest.approx(3 / 8) and metrics["clip_frac_high"] == pytest.approx(3 / 8)


def test_defaults():
    loss = GSPO(GSPO.Options()).policy_loss()
    assert (loss.clip_low, loss.clip_high, loss.agg) == (3e-4, 4e-4, "seq-mean-token-mean")
