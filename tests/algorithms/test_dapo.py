"""DAPO (arXiv 2503.14476): clip-higher, token-level loss, dynamic sampling, overlong shaping and filtering."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlcore.testing import make_batch
from rlcore_algorithms.dapo import DAPO
from rlcore.toolkit import keep_varied_groups, overlong_penalty


def test_overlong_penalty_by_hand():
    # eq. 13 with L_max = 10, L_cache = 4: 0 up to 6 tokens, (6 - |y|) / 4 up to 10, -1 beyond
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4), expected)
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, factor=0.5), expected * 0.5)
    assert torch.equal(overlong_penalty(lengths, 10, 0), torch.zeros(6))


def test_keep_groups_drops_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    ids = torch.tensor([0, 0, 1, 1, 3, 3, 4])  # id 2 absent, group 4 has one sample
    assert keep_varied_groups(rewards, ids).tolist() == [False, True, True, False, True]


def test_defaults_and_loss_by_hand(run_loss):
    algo = DAPO(DAPO.Options())
    loss = algo.policy_loss()
    assert (loss.clip_low, loss.clip_high, loss.agg) == (0.2, 0.28, "token-mean")
    assert not loss.needs_ref_logprobs
    # eq. 8: J = 1 / sum|o_i| sum_i sum_t min(r A, clip(r, 1 - 0.2, 1 + 0.28) A); 5 tokens
    logp = [[math.log(1.25), math.log(1.4)], [math.log(0.7), math.log(0.9), math.log(1.1)]]
    adv = [[1.0, 1.0], [-1.0, -1.0, -1.0]]
    ratios = [1.25, 1.4, 0.7, 0.9, 1.1]
    advs = [1, 1, -1, -1, -1]
    objective = sum(min(r * a, min(max(r, 0.8), 1.28) * a) for r, a in zip(ratios, advs)) / 5
    value, metrics, _ = run_loss(loss, [logp[0] + [0.0], logp[1]], [adv[0] + [0.0], adv[1]],
                                 mask=[[1, 1, 0], [1, 1, 1]], old=[[0.0] * 3] * 2)
    assert value == pytest.approx(-objective)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 5)  # 1.4 > 1.28 with A > 0
    assert metrics["clip_frac_low"] == pytest.approx(1 / 5)  # 0.7 < 0.8 with A < 0


def test_hook_filters_and_shapes():
    algo = DAPO(DAPO.Options(overlong_buffer=2, max_response_length=5))
    batch = make_batch(groups=3, n=2, response_len=5, lengths=[5, 2, 3, 3, 4, 1],
                       rewards=[1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert algo.keep_groups(batch).tolist() == [False, True, False]  # filtered on the task reward
    adv = algo.advantage(batch)
    # budget 5, buffer 2: lengths 5 -> -1, 4 -> -0.5, <= 3 -> 0; shaped [0, 1], [1, 0], [-0.5, 0]
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(adv[:, 0], torch.tensor([-a, a, a, -a, -a, a]))


def test_buffer_defaults_to_a_fifth_of_the_sampling_budget():
    algo = DAPO(DAPO.Options())
    algo.setup(SimpleNamespace(config={"sampling": {"max_new_tokens": 10}}))
    batch = make_batch(groups=1, n=2, response_len=10, lengths=[10, 7], rewards=[1.0, 1.0])
    algo.advantage(batch)  # buffer 2: length 10 -> -1, length 7 -> 0
    assert algo.last_metrics["overlong_penalty_mean"] == pytest.approx(-0.5)
    tiny = DAPO(DAPO.Options())
    tiny.setup(SimpleNamespace(config={"sampling": {"max_new_tokens": 4}}))
    tiny.advantage(make_batch(groups=1, n=2, response_len=4, lengths=[4, 4], rewards=[1.0, 0.0]))
    assert "overlong_penalty_mean" not in tiny.last_metrics  # a fifth of 4 tokens rounds to 0: off


def test_mask_truncated_removes_them_from_the_loss():
    algo = DAPO(DAPO.Options(mask_truncated=True, overlong_buffer=0))
    batch = make_batch(groups=1, n=3, response_len=3, lengths=[3, 1, 2], rewards=[1.0, 0.0, 0.5])
    assert batch.truncated.tolist() == [True, False, False]
    adv = algo.advantage(batch)
    assert batch.response_mask[0].sum() == 0 and adv[0].abs().sum() == 0
    assert adv[1:].abs().sum() > 0
    assert algo.last_metrics["truncated_masked_frac"] == pytest.approx(1 / 3)


def test_explicit_buffer_without_a_budget_is_an_error():
    with pytest.raises(ValueError, match="max_response_length"):
        DAPO(DAPO.Options(overlong_buffer=2)).advantage(make_batch())
    DAPO(DAPO.Options()).advantage(make_batch())  # the default (a fifth of an unknown budget) stays off
