"""The rollout-vs-trainer logprob mismatch metric, against its definition."""

import math

import pytest
import torch

from rlcore.metrics import combine, finish_mismatch, logprob_mismatch, mean_over_steps, mismatch_parts


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
    assert m["mismatch/iw_std"] == pytest.approx(math.sqrt(sum((w - mean_w) ** 2 for w in weights) / 4), abs=1e-6)
    assert m["mismatch/iw_min"] == pytest.approx(math.exp(-0.1), abs=1e-6)
    assert m["mismatch/iw_max"] == pytest.approx(math.exp(0.2), abs=1e-6)


def test_identical_logprobs_give_zero_difference_and_unit_weights():
    lp = torch.randn(4, 5)
    m = logprob_mismatch(lp, lp.clone(), torch.ones(4, 5))
    assert m["mismatch/abs_diff_max"] == 0.0 and m["mismatch/iw_min"] == m["mismatch/iw_max"] == 1.0


def test_an_empty_mask_logs_nothing():
    assert logprob_mismatch(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3)) == {}


def test_parts_combined_over_micro_batches_equal_the_whole_batch():
    """The update computes the mismatch per micro-batch (and per rank): the combined parts must give
    exactly the whole batch's metrics, maxima and minima included, however the rows were split."""
    gen = torch.Generator().manual_seed(0)
    trainer = torch.randn(7, 9, generator=gen)
    rollout = trainer + 0.05 * torch.randn(7, 9, generator=gen)
    mask = (torch.rand(7, 9, generator=gen) > 0.3).float()
    mask[3] = 0.0  # a row with no loss token: its part carries no maximum or minimum
    whole = logprob_mismatch(trainer, rollout, mask)
    tokens = float(mask.sum())
    totals: dict[str, float] = {}
    for rows in (slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 7)):
        combine(totals, mismatch_parts(trainer[rows], rollout[rows], mask[rows], tokens))
    assert finish_mismatch(totals) == pytest.approx(whole, abs=1e-12)
    assert whole["mismatch/iw_std"] > 0.01


def test_nearly_equal_logprobs_keep_their_spread():
    """fp32 engines agree to ~1e-7: w - 1 is taken exactly, so the spread is not lost to rounding at 1."""
    lp = torch.zeros(1, 4, dtype=torch.float64)
    m = logprob_mismatch(lp + torch.tensor([[1e-7, -1e-7, 1e-7, -1e-7]], dtype=torch.float64), lp, torch.ones(1, 4))
    assert m["mismatch/iw_std"] == pytest.approx(1e-7, rel=1e-3)


def test_maxima_and_minima_are_not_summed_over_steps():
    totals = combine(combine({}, {"loss": 1.0, "x_max": 3.0, "x_min": -1.0}), {"loss": 3.0, "x_max": 2.0, "x_min": -4.0})
    assert mean_over_steps(totals, 2) == {"loss": 2.0, "x_max": 3.0, "x_min": -4.0}
