"""The cispo algorithm's hooks called alone on small tensors, against the paper's formula."""

from __future__ import annotations

import torch

from rlcore import LossInputs, LossNorm
from rlcore.config import build_options
from rlcore.testing import check_algorithm, make_batch
from rlcore_plugin_example.algorithm import CISPO, CISPOLoss


def cispo(**options: object) -> CISPO:
    return CISPO(build_options(CISPO.Options, options, "algo"))


def test_contract():
    check_algorithm(cispo())


def test_gradient_is_the_clipped_weight_times_the_advantage_on_every_token():
    """d loss / d log pi_t = -min(r_t, 1 + clip_high) A_t / tokens, also where PPO would clip to zero."""
    old = torch.zeros(1, 4)
    log_ratio = torch.tensor([[0.0, 0.5, -0.5, 0.1]])
    logprobs = (old + log_ratio).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4)
    loss, metrics = CISPOLoss(clip_high=0.2)(LossInputs(logprobs=logprobs, advantages=adv, mask=mask,
                                                        old_logprobs=old), LossNorm.of(mask, 4))
    loss.backward()
    weight = log_ratio.exp().clamp(max=1.2)
    torch.testing.assert_close(logprobs.grad, -weight * adv / 4)
    assert logprobs.grad[0, 1] != 0  # ratio e^0.5 > 1.2 with A > 0: PPO's gradient would vanish here
    assert float(metrics["clip_frac"]) == 0.25  # only the second token's weight was cut


def test_a_lower_bound_applies_only_when_set():
    old = torch.zeros(1, 1)
    logprobs = torch.full((1, 1), -1.0, requires_grad=True)
    mask = torch.ones(1, 1)
    for clip_low, weight in ((None, torch.exp(torch.tensor(-1.0))), (0.2, torch.tensor(0.8))):
        logprobs.grad = None
        loss, _ = CISPOLoss(clip_low=clip_low)(LossInputs(logprobs=logprobs, advantages=torch.ones(1, 1), mask=mask,
                                                          old_logprobs=old), LossNorm.of(mask, 1))
        loss.backward()
        torch.testing.assert_close(logprobs.grad, -weight.reshape(1, 1))


def test_advantages_are_group_normalised():
    batch = make_batch(groups=2, n=4)
    batch.rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = cispo().advantage(batch)
    assert adv[4:].abs().sum() == 0  # a group of equal rewards carries no signal
    assert float(adv[0][batch.response_mask[0] > 0].mean()) > 0 > float(adv[1][batch.response_mask[1] > 0].mean())
