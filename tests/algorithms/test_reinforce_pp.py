"""REINFORCE++ (arXiv 2501.03262): token returns whitened over the batch; the group-baseline variant."""

from __future__ import annotations

import math

import torch

from rlcore.testing import make_batch
from rlcore.toolkit import discounted_returns, masked_whiten
from rlcore_algorithms.reinforce_pp import ReinforcePP


def test_whitened_returns_by_hand():
    batch = make_batch(groups=1, n=2, response_len=3, lengths=[3, 2], rewards=[1.0, 0.0])
    adv = ReinforcePP(ReinforcePP.Options()).advantage(batch)
    # gamma 1: returns [[1, 1, 1], [0, 0, -]]; 5 tokens: mean 0.6, unbiased var (3 * 0.16 + 2 * 0.36) / 4 = 0.3
    s = math.sqrt(0.3 + 1e-8)
    expected = torch.tensor([[0.4 / s] * 3, [-0.6 / s, -0.6 / s, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_discount_skips_tool_tokens_and_kl_penalty_is_per_token():
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    rewards = torch.tensor([[-0.1, 0.0, -0.1, 0.9]])  # outcome 1 at the last token, KL penalty 0.1 each
    g = 0.5
    # G3 = 0.9; G2 = -0.1 + 0.5 * 0.9 = 0.35; G1 (tool output) passes 0.35; G0 = -0.1 + 0.5 * 0.35 = 0.075
    torch.testing.assert_close(discounted_returns(rewards, mask, g), torch.tensor([[0.075, 0.35, 0.35, 0.9]]))

    batch = make_batch(groups=1, n=2, response_len=3, lengths=[3, 3], rewards=[1.0, 0.0])
    batch.ref_logprobs = batch.rollout_logprobs - 0.2  # k1 = 0.2 on every token
    algo = ReinforcePP(ReinforcePP.Options(kl_coef=0.5, kl_mode="reward", kl_estimator="k1"))
    adv = algo.advantage(batch)
    returns = torch.tensor([[0.7, 0.8, 0.9], [-0.3, -0.2, -0.1]])  # sum of -0.1 per token plus the outcome
    picked = returns.flatten()
    torch.testing.assert_close(adv, (returns - picked.mean()) / torch.sqrt(picked.var() + 1e-8))


def test_baseline_variant_by_hand():
    batch = make_batch(groups=2, n=2, response_len=2, lengths=[2, 1, 2, 2], rewards=[1.0, 0.0, 1.0, 1.0])
    adv = ReinforcePP(ReinforcePP.Options(baseline=True)).advantage(batch)
    # centred [0.5, -0.5, 0, 0] on 7 tokens: values [.5, .5, -.5, 0, 0, 0, 0]
    values = torch.tensor([0.5, 0.5, -0.5, 0, 0, 0, 0])
    mean, std = values.mean(), torch.sqrt(values.var() + 1e-8)
    expected = torch.tensor([[0.5, 0.5], [-0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    white = (expected - mean) / std
    white[1, 1] = 0.0
    torch.testing.assert_close(adv, white)


def test_whiten_degenerate_cases():
    assert torch.equal(masked_whiten(torch.full((2, 3), 0.7), torch.ones(2, 3)), torch.zeros(2, 3))
    one = torch.zeros(2, 3)
    one[0, 0] = 1
    assert torch.equal(masked_whiten(torch.randn(2, 3), one), torch.zeros(2, 3))
