"""GRPO against hand-computed examples and the DeepSeekMath objective (arXiv 2402.03300, eq. 3)."""

from __future__ import annotations

import math

import pytest
import torch

from rlcore import plugins
from rlcore.config import build_options
from rlcore.errors import ConfigError
from rlcore.testing import make_batch
from rlcore.toolkit import ClippedSurrogateLoss, grpo_advantages, KLController
from rlcore_algorithms.grpo import GRPO


def grpo(**opts) -> GRPO:
    return GRPO(GRPO.Options(**opts))


def test_advantage_by_hand():
    # rewards 1,0,0,0: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))
    raw = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0]), norm_by_std=False)
    torch.testing.assert_close(raw, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_advantage_eps_and_any_group_ids():
    # groups 7 (rewards 2, 0 -> mean 1, std sqrt(2)) and -3 (rewards 1, 3, 5 -> mean 3, std 2)
    r = torch.tensor([2.0, 1.0, 0.0, 3.0, 5.0])
    ids = torch.tensor([7, -3, 7, -3, -3])
    s2 = math.sqrt(2.0)
    expected = torch.tensor([1 / (s2 + 0.1), -2 / (2 + 0.1), -1 / (s2 + 0.1), 0.0, 2 / (2 + 0.1)])
    torch.testing.assert_close(grpo_advantages(r, ids, eps=0.1), expected)


def test_group_of_one_and_equal_rewards_give_zero():
    r = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.7, 0.7])
    ids = torch.tensor([0, 1, 1, 1, 2, 2])
    adv = grpo_advantages(r, ids)
    assert torch.equal(adv, torch.zeros(6))


def test_hook_broadcasts_and_masks():
    batch = make_batch(groups=2, n=2, response_len=5, lengths=[3, 5, 1, 2], rewards=[1.0, 0.0, 0.0, 0.0])
    batch.response_mask[1, 2] = 0.0  # a tool-output token
    adv = grpo().advantage(batch)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # rewards 1, 0: deviation 0.5, unbiased std sqrt(0.5)
    expected = torch.tensor([[a, a, a, 0, 0], [-a, -a, 0, -a, -a], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    torch.testing.assert_close(adv, expected.float())


def test_clipped_surrogate_tokens_by_hand(run_loss):
    loss = ClippedSurrogateLoss(clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    ratios = [1.5, 0.5, 5.0, 0.5, 1.1, 1.1]
    advs = [1.0, -1.0, -1.0, 1.0, -1.0, 1.0]
    # per token: clipped high -> -1.2; clipped low -> 0.8; dual clip -> 3; unclipped -0.5, 1.1, -1.1
    expected = [-1.2, 0.8, 3.0, -0.5, 1.1, -1.1]
    grads = [0, 0, 0, -0.5, 1.1, -1.1]  # d(-A r)/d log r = -A r where not clipped, per token / 6
    value, metrics, grad = run_loss(loss, [[math.log(r) for r in ratios]], [advs], old=[[0.0] * 6])
    assert value == pytest.approx(sum(expected) / 6)
    torch.testing.assert_close(grad, torch.tensor([grads], dtype=torch.float64) / 6)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 6)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 6)
    assert metrics["clip_frac_dual"] == pytest.approx(1 / 6)
    assert metrics["clip_frac"] == pytest.approx(3 / 6)
    assert metrics["ratio_mean"] == pytest.approx(sum(ratios) / 6)


def test_matches_deepseekmath_objective(run_loss):
    """J = 1/G sum_i 1/|o_i| sum_t [min(r A, clip(r, 1-e, 1+e) A) - beta D_KL], D_KL = q - log q - 1 with
    q = pi_ref / pi; the loss is -J (no dual clip in the paper)."""
    eps, beta = 0.2, 0.04
    logp = [[-1.0, -0.5, -2.0], [-0.3, -0.1, 0.0]]
    old = [[-1.3, -0.4, -2.0], [-0.1, -0.6, 0.0]]
    ref = [[-1.1, -0.9, -1.5], [-0.2, -0.2, 0.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    adv = [[0.7, 0.7, 0.7], [-0.7, -0.7, 0.0]]
    objective = 0.0
    for i in range(2):
        n = sum(mask[i])
        for t in range(n):
            r = math.exp(logp[i][t] - old[i][t])
            surrogate = min(r * adv[i][t], min(max(r, 1 - eps), 1 + eps) * adv[i][t])
            q = math.exp(ref[i][t] - logp[i][t])
            objective += (surrogate - beta * (q - math.log(q) - 1)) / n / 2
    loss = ClippedSurrogateLoss(agg="seq-mean-token-mean", clip_low=eps, clip_high=eps, dual_clip=None,
                                kl=KLController(beta), kl_estimator="k3")
    value, metrics, _ = run_loss(loss, logp, adv, mask=mask, old=old, ref_logprobs=ref)
    assert value == pytest.approx(-objective, rel=1e-9)
    assert loss.needs_ref_logprobs and not loss.needs_entropy


def test_no_reference_without_kl():
    assert not grpo().policy_loss().needs_ref_logprobs
    assert grpo(kl_coef=0.01).policy_loss().needs_ref_logprobs
    assert grpo(kl_coef=0.01, kl_mode="reward").policy_loss().needs_ref_logprobs
    assert grpo(entropy_coef=0.01).policy_loss().needs_entropy


def test_entry_point_and_option_errors():
    cls = plugins.load("algo", "grpo")
    assert cls is GRPO
    assert plugins.instantiate(cls, {"clip_high": "0.28"}, "algo").options.clip_high == 0.28
    with pytest.raises(ConfigError, match="algo.*clip_low.*in \\[0.0, 1.0\\]"):
        build_options(GRPO.Options, {"clip_low": 1.5}, "algo")
    with pytest.raises(ConfigError, match="kl_estimator.*'k1', 'k2', 'k3', 'abs'"):
        build_options(GRPO.Options, {"kl_estimator": "k4"}, "algo")


def test_truncated_importance_sampling_and_entropy_bonus(run_loss):
    """TIS weights min(pi_old / pi_rollout, cap) multiply each token's loss; the entropy bonus subtracts."""
    loss = ClippedSurrogateLoss(tis_cap=2.0, entropy_coef=0.1)
    assert loss.needs_entropy and not loss.needs_ref_logprobs
    # on-policy (old = current), rollout engine disagrees: weights exp(0.5) and exp(2) -> capped at 2
    value, metrics, grad = run_loss(loss, [[0.0, 0.0]], [[1.0, -1.0]], rollout_logprobs=[[-0.5, -2.0]],
                                    entropy=[[0.5, 1.5]])
    w = [math.exp(0.5), 2.0]
    assert value == pytest.approx((-w[0] + w[1]) / 2 - 0.1 * (0.5 + 1.5) / 2)
    torch.testing.assert_close(grad, torch.tensor([[-w[0] / 2, w[1] / 2]], dtype=torch.float64))
    assert metrics["tis_weight_mean"] == pytest.approx(sum(w) / 2)
    assert metrics["entropy_loss"] == pytest.approx(1.0)
    assert metrics["approx_kl"] == 0.0 and metrics["ratio_mean"] == 1.0
