"""KL estimators, the adaptive coefficient, KL as a loss term and as a reward penalty."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcore.testing import make_batch
from rlcore.toolkit import ClippedSurrogateLoss, grpo_advantages, kl_estimate, KL_ESTIMATORS, KLController
from rlcore_algorithms.grpo import GRPO


def test_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # log(pi / pi_ref) = 1
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_estimate(logp, ref, "abs").item() == pytest.approx(1.0)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)  # q - log q - 1, q = e^-1
    assert kl_estimate(ref, logp, "abs").item() == pytest.approx(1.0)
    assert kl_estimate(ref, logp, "k1").item() == pytest.approx(-1.0)


def test_k1_and_k3_are_unbiased_under_the_sampler():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    for estimator in ("k1", "k3"):
        expected = float((p * kl_estimate(p.log(), q.log(), estimator)).sum())
        assert expected == pytest.approx(exact)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-15, 0), min_size=1, max_size=8), st.lists(st.floats(-15, 0), min_size=1, max_size=8))
def test_non_negative_and_zero_at_equal_policies(a, b):
    n = min(len(a), len(b))
    x, y = torch.tensor(a[:n], dtype=torch.float64), torch.tensor(b[:n], dtype=torch.float64)
    for estimator in KL_ESTIMATORS:
        assert torch.equal(kl_estimate(x, x, estimator), torch.zeros(n, dtype=torch.float64))
        if estimator != "k1":
            assert (kl_estimate(x, y, estimator) >= 0).all()


def test_adaptive_coefficient():
    fixed = KLController(0.1)
    fixed.update(kl=5.0, samples=100)
    assert fixed.value == 0.1
    ctl = KLController(0.1, target=0.05, horizon=1000)
    ctl.update(kl=0.1, samples=100)  # error min(0.1 / 0.05 - 1, 0.2) = 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ctl.update(kl=0.045, samples=100)  # error 0.045 / 0.05 - 1 = -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 100 / 1000))


def test_kl_loss_term(run_loss):
    loss = ClippedSurrogateLoss(kl=KLController(0.5), kl_estimator="k2")
    logp, ref = [[-1.0, -0.5]], [[-1.5, -0.5]]
    value, metrics, grad = run_loss(loss, logp, [[0.0, 0.0]], ref_logprobs=ref)
    # zero advantages: the loss is 0.5 * mean(0.5 * d^2) with d = [0.5, 0]
    assert value == pytest.approx(0.5 * (0.5 * 0.25) / 2)
    assert metrics["kl_loss"] == pytest.approx(0.125 / 2)
    assert metrics["kl_ref"] == pytest.approx((math.exp(-0.5) + 0.5 - 1) / 2)
    torch.testing.assert_close(grad, torch.tensor([[0.5 * 0.5 / 2, 0.0]], dtype=torch.float64))


def test_kl_loss_needs_reference_logprobs(run_loss):
    with pytest.raises(ValueError, match="ref_logprobs"):
        run_loss(ClippedSurrogateLoss(kl=KLController(0.1)), [[-1.0]], [[1.0]])


def test_kl_in_reward_for_grpo():
    batch = make_batch(groups=1, n=3, response_len=3, lengths=[3, 2, 1], rewards=[1.0, 0.0, 0.5])
    batch.ref_logprobs = batch.rollout_logprobs - torch.tensor([0.1, 0.2, 0.3])
    algo = GRPO(GRPO.Options(kl_coef=0.5, kl_mode="reward", kl_estimator="k1"))
    assert algo.policy_loss().needs_ref_logprobs and algo.policy_loss().kl_coef == 0.0
    adv = algo.advantage(batch)
    # k1 per token = rollout - ref = 0.1, 0.2, 0.3 in columns 0, 1, 2; responses have 3, 2 and 1 tokens
    shaped = torch.tensor([1.0 - 0.5 * 0.6, 0.0 - 0.5 * 0.3, 0.5 - 0.5 * 0.1])
    expected = grpo_advantages(shaped, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(adv[:, 0], expected)
    metrics = algo.step_metrics()
    assert metrics["algo/kl_ref_measured"] == pytest.approx((0.6 / 3 + 0.3 / 2 + 0.1) / 3)  # of sequence means
    assert metrics["algo/kl_coef"] == 0.5 and algo.step_metrics() == {}


def test_adaptive_kl_moves_between_steps_and_is_checkpointed(tmp_path):
    """The loop makes the loss once at setup: it must see the coefficient adapt and be restored."""
    batch = make_batch(groups=2, n=2, response_len=3)
    batch.ref_logprobs = batch.rollout_logprobs - 1.0  # k1 = 1 on every token, far above the target
    algo = GRPO(GRPO.Options(kl_coef=0.1, kl_estimator="k1", kl_target=0.01, kl_horizon=40))
    loss = algo.policy_loss()
    assert loss.kl_coef == 0.1
    algo.advantage(batch)
    grown = 0.1 * (1 + 0.2 * 4 / 40)  # error clipped to 0.2, 4 samples
    assert loss.kl_coef == pytest.approx(grown)
    algo.save_state(tmp_path)
    fresh = GRPO(GRPO.Options(kl_coef=0.1, kl_target=0.01))
    fresh_loss = fresh.policy_loss()
    fresh.load_state(tmp_path)
    assert fresh_loss.kl_coef == pytest.approx(grown)


def test_reward_kl_needs_reference_logprobs():
    GRPO(GRPO.Options(kl_coef=0.1)).advantage(make_batch())  # a KL loss term: measured only when available
    with pytest.raises(ValueError, match="ref_logprobs"):
        GRPO(GRPO.Options(kl_coef=0.1, kl_mode="reward")).advantage(make_batch())


def test_loss_object_pickles():
    loss = GRPO(GRPO.Options(kl_coef=0.1, entropy_coef=0.01)).policy_loss()
    again = pickle.loads(pickle.dumps(loss))
    assert again == loss and again.needs_ref_logprobs and again.needs_entropy
