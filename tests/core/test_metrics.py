"""The rollout-vs-trainer logprob mismatch metric, against its definition."""

import math

import pytest
import torch

from rlcore.metrics import logprob_mismatch


def test_mismatch_is_computed_over_loss_tokens_only():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, 0.0]])
    rollout = torch.tensor([[-1.2, -2.0, -9.0], [-0.4, -0.1, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the large differences sit on masked tokens
    m = logprob_mismatch(trainer, rollout, mask)
    diffs = [0.2, 0.0, -0.1, 0.0]
    weights = [math.exp(d) for d in diffs]
    mean_w = sum(weights) / 4
    assert m["mismatch/abs_diff_mean"] == pytest.approx(sum(abs(d) for d in diffs) / 4, abs=1e-6)
    assert m["mismatch/abs_diff_max"] == pytest.approx(0.2, abs=1e-6)
    assert m["mismatch/iw_mean"] == pytest.approx(mean_w, abs=1e-6)
    assert m["mismatch/iw_std"] == pytest.approx(math.sqrt(sum((w - mean_w) ** 2 for w in weights) / 3), abs=1e-6)
    assert m["mismatch/iw_min"] == pytest.approx(math.exp(-0.1), abs=1e-6)
    assert m["mismatch/iw_max"] == pytest.approx(math.exp(0.2), abs=1e-6)


def test_identical_logprobs_give_zero_difference_and_unit_weights():
    lp = torch.randn(4, 5)
    m = logprob_mismatch(lp, lp.clone(), torch.ones(4, 5))
    assert m["mismatch/abs_diff_max"] == 0.0 and m["mismatch/iw_min"] == m["mismatch/iw_max"] == 1.0


def test_an_empty_mask_logs_nothing():
    assert logprob_mismatch(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3)) == {}
