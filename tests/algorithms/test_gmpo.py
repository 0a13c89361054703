"""GMPO against its objective (arXiv 2507.20673, eq. 5) written in ratio space, and its clipping."""

from __future__ import annotations

import math

import pytest
import torch

from rlcore.testing import make_batch
from rlcore_algorithms.gmpo import GMPO
from rlcore.toolkit import GMPOLoss


def gmpo_objective(logp, old, adv, mask, low=0.4, high=0.4):
    """1/G sum_i (prod_t |min(rho A, clip(rho, e^-low, e^high) A)|)^(1 / |o_i|) sgn(A_i)."""
    total = 0.0
    for lp_i, old_i, a, m_i in zip(logp, old, adv, mask):
        n = sum(m_i)
        prod = 1.0
        for lp, o, m in zip(lp_i, old_i, m_i):
            if m:
                rho = math.exp(lp - o)
                prod *= abs(min(rho * a, min(max(rho, math.exp(-low)), math.exp(high)) * a))
        total += prod ** (1 / n) * math.copysign(1.0, a) if a else 0.0
    return total / len(logp)


def test_loss_matches_paper_objective(run_loss):
    logp = [[-0.4, -1.2, -0.3], [-0.9, -2.0, -0.5], [-1.0, -1.0, -1.0]]
    old = [[-1.0, -1.0, -0.5], [-1.5, -1.3, -0.5], [-1.2, -0.9, -1.0]]
    adv, mask = [0.5, -2.0, 1.5], [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    adv_tokens = [[a * m for m in row] for a, row in zip(adv, mask)]
    value, metrics, _ = run_loss(GMPOLoss(), logp, adv_tokens, mask=mask, old=old)
    assert value == pytest.approx(-gmpo_objective(logp, old, adv, mask), rel=1e-9)


def test_sign_aware_clipping_by_hand(run_loss):
    # sequence 1: A = 0.5, log-ratios [0.6, -0.2] -> min with clip -> [0.4, -0.2], mean 0.1
    # sequence 2: A = -2, log-ratios [0.6, -0.7] -> max with clip -> [0.6, -0.4], mean 0.1
    old = [[0.0, 0.0], [0.0, 0.0]]
    logp = [[0.6, -0.2], [0.6, -0.7]]
    value, metrics, grad = run_loss(GMPOLoss(), logp, [[0.5, 0.5], [-2.0, -2.0]], old=old)
    e = math.exp(0.1)
    assert value == pytest.approx((-0.5 * e + 2.0 * e) / 2)
    # d/dlp of -A exp(mean) = -A exp(mean) / n for unclipped tokens, 0 for clipped ones; / 2 sequences
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5 * e / 2 / 2], [2.0 * e / 2 / 2, 0.0]],
                                                  dtype=torch.float64))
    assert metrics["clip_frac_high"] == pytest.approx(0.25)
    assert metrics["clip_frac_low"] == pytest.approx(0.25)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx(e)


def test_defaults_and_hook():
    algo = GMPO(GMPO.Options())
    loss = algo.policy_loss()
    assert (loss.clip_low, loss.clip_high, loss.agg) == (0.4, 0.4, "seq-mean-token-mean")
    assert not loss.needs_ref_logprobs and algo.keep_groups(make_batch()) is None
    batch = make_batch(groups=1, n=2, response_len=3, lengths=[3, 2], rewards=[1.0, 0.0])
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(algo.advantage(batch), torch.tensor([[a, a, a], [-a, -a, 0.0]]))


def test_composes_with_dapo_dynamic_sampling_and_overlong_shaping():
    """The GMPO + DAPO math recipe: DAPO's filter and overlong punishment switched on by options."""
    algo = GMPO(GMPO.Options(dynamic_sampling=True, overlong_buffer=2, max_response_length=4))
    batch = make_batch(groups=2, n=2, response_len=4, lengths=[2, 4, 1, 3], rewards=[1.0, 1.0, 0.0, 1.0])
    assert algo.keep_groups(batch).tolist() == [False, True]
    adv = algo.advantage(batch)
    # overlong: length 4 -> -1, length 3 -> -0.5; group 0 shaped [1, 0], group 1 shaped [0, 0.5]
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(adv[:, 0], torch.tensor([a, -a, -a, a]))
    assert algo.last_metrics["overlong_frac"] == pytest.approx(0.5)
