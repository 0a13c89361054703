"""Properties over every algorithm: symmetry, zero-mean groups, clipping on both signs, GMPO = GRPO at
ratio 1, and finite results on degenerate batches (groups of one, equal rewards, masked, empty, truncated)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcore import plugins
from rlcore.testing import make_batch
from rlcore.types import LossInputs, LossNorm
from rlcore.toolkit import ClippedSurrogateLoss, GMPOLoss, grpo_advantages

ALGOS = ["grpo", "drgrpo", "gmpo", "dapo", "gspo", "rloo", "reinforce_pp"]


def make(name: str, **options):
    return plugins.instantiate(plugins.load("algo", name), options, "algo")


def norm_of(mask: torch.Tensor) -> LossNorm:
    return LossNorm(float(mask.sum()), float((mask.sum(-1) > 0).sum()), mask.shape[1])


rewards_lists = st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 0.25]), min_size=2, max_size=5)


@settings(max_examples=20, deadline=None)
@given(groups=st.lists(rewards_lists, min_size=1, max_size=3), seed=st.integers(0, 1000),
       name=st.sampled_from(ALGOS + ["reinforce_pp_baseline"]))
def test_permuting_samples_permutes_advantages(groups, seed, name):
    rewards = [r for g in groups for r in g]
    algo = make("reinforce_pp", baseline=True) if name == "reinforce_pp_baseline" else make(name)
    batch = make_batch(groups=1, n=len(rewards), response_len=4, rewards=rewards, seed=seed)
    batch.group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    g = torch.Generator().manual_seed(seed)
    perm = torch.cat([torch.nonzero(batch.group_ids == i).flatten()[torch.randperm(len(grp), generator=g)]
                      for i, grp in enumerate(groups)])  # shuffled within each group, groups kept in order
    adv = algo.advantage(batch)
    torch.testing.assert_close(algo.advantage(batch.select(perm)), adv[perm])


@settings(max_examples=40, deadline=None)
@given(groups=st.lists(st.lists(st.floats(-5, 5), min_size=1, max_size=6), min_size=1, max_size=4),
       norm_by_std=st.booleans())
def test_grpo_advantages_have_zero_mean_per_group(groups, norm_by_std):
    rewards = torch.tensor([r for g in groups for r in g], dtype=torch.float64)
    ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    adv = grpo_advantages(rewards, ids, norm_by_std)
    assert torch.isfinite(adv).all()
    for i in range(len(groups)):
        assert abs(adv[ids == i].sum().item()) < 1e-6 * max(1.0, adv.abs().max().item())


@settings(max_examples=60, deadline=None)
@given(log_ratio=st.floats(-3, 3), adv=st.floats(0.01, 5).flatmap(lambda a: st.sampled_from([a, -a])))
def test_clipping_on_both_advantage_signs(log_ratio, adv):
    low, high, c = 0.2, 0.28, 3.0
    r = math.exp(log_ratio)
    if adv > 0:  # pessimistic bound: the ratio counts up to 1 + high only
        expected, flows = -adv * min(r, 1 + high), r <= 1 + high
    else:  # down to 1 - low, and the loss is capped at -A * c (dual clip)
        expected, flows = min(-adv * max(r, 1 - low), -adv * c), 1 - low <= r <= c
    lp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    inputs = LossInputs(logprobs=lp, advantages=torch.tensor([[adv]], dtype=torch.float64),
                        mask=torch.ones(1, 1, dtype=torch.float64), old_logprobs=torch.zeros(1, 1, dtype=torch.float64))
    value, metrics = ClippedSurrogateLoss(clip_low=low, clip_high=high, dual_clip=c)(inputs, LossNorm(1, 1, 1))
    value.backward()
    assert value.item() == pytest.approx(expected)
    assert (lp.grad.item() != 0) == flows
    assert metrics["clip_frac"].item() == (0.0 if flows else 1.0)

    gmpo_value, _ = GMPOLoss(clip_low=low, clip_high=high)(inputs, LossNorm(1, 1, 1))
    clipped = min(max(log_ratio, -low), high)
    bound = min(log_ratio, clipped) if adv > 0 else max(log_ratio, clipped)
    assert gmpo_value.item() == pytest.approx(-adv * math.exp(bound))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_gmpo_equals_grpo_where_every_ratio_is_one(seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(5, 4, generator=g) < 0.7).double()
    adv = torch.randn(5, 1, generator=g, dtype=torch.float64) * mask
    results = []
    for loss in (GMPOLoss(), ClippedSurrogateLoss(agg="seq-mean-token-mean")):
        lp = (-torch.rand(5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).requires_grad_()
        value, metrics = loss(LossInputs(logprobs=lp, advantages=adv, mask=mask), norm_of(mask))  # on-policy
        value.backward()
        results.append((value.detach(), lp.grad, metrics["ratio_mean"]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2])


def degenerate_batch():
    """Group 0: one sample; group 1: equal rewards; group 2: an empty, a truncated and a tool-using response."""
    batch = make_batch(groups=1, n=7, response_len=5, lengths=[3, 2, 5, 4, 0, 5, 3],
                       rewards=[1.0, 0.5, 0.5, 0.5, 0.0, 1.0, 0.0], seed=3)
    batch.group_ids = torch.tensor([0, 1, 1, 1, 2, 2, 2])
    batch.response_mask[6, 1] = 0.0  # a tool-output token inside a response
    batch.ref_logprobs = batch.rollout_logprobs - 0.1 * batch.attention_mask
    return batch


OPTION_SETS = [{}, {"kl_coef": 0.1}, {"kl_coef": 0.1, "kl_mode": "reward", "kl_estimator": "k1", "kl_target": 0.05},
               {"entropy_coef": 0.01, "tis_cap": 2.0},
               {"dynamic_sampling": True, "overlong_buffer": 2, "max_response_length": 5, "mask_truncated": True}]


@pytest.mark.parametrize("name", ALGOS)
@pytest.mark.parametrize("options", OPTION_SETS, ids=["defaults", "kl-loss", "kl-reward", "entropy-tis", "dapo-parts"])
def test_degenerate_batches_are_finite_and_defined(name, options):
    algo = make(name, **options)
    batch = degenerate_batch()
    loss = algo.policy_loss()
    adv = algo.advantage(batch)
    mask = batch.response_mask
    assert torch.isfinite(adv).all() and (adv[mask == 0] == 0).all()
    if name != "reinforce_pp":  # group-based estimators: a group of one has no baseline
        assert (adv[0] == 0).all()
    shaped = options.get("kl_mode") == "reward" or "overlong_buffer" in options
    if not shaped and name != "reinforce_pp":
        assert (adv[1:4] == 0).all()  # equal rewards
    g = torch.Generator().manual_seed(0)
    lp = (batch.rollout_logprobs + 0.3 * torch.randn(7, 5, generator=g)).requires_grad_()
    entropy = torch.rand(7, 5, generator=g).requires_grad_()
    inputs = LossInputs(logprobs=lp, advantages=adv, mask=mask, old_logprobs=batch.rollout_logprobs + 0.05,
                        rollout_logprobs=batch.rollout_logprobs,
                        ref_logprobs=batch.ref_logprobs if loss.needs_ref_logprobs else None,
                        entropy=entropy if loss.needs_entropy else None)
    value, metrics = loss(inputs, norm_of(mask))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(lp.grad).all() and (lp.grad[mask == 0] == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    assert all(math.isfinite(v) for v in algo.last_metrics.values())


@pytest.mark.parametrize("name", ALGOS)
def test_all_equal_rewards_give_zero_advantages(name):
    batch = make_batch(groups=3, n=3, rewards=[0.3] * 9)
    assert torch.equal(make(name).advantage(batch), torch.zeros(9, 6))
