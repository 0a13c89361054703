"""RLOO (arXiv 2402.14740): the baseline of a sample is the mean reward of the other samples of its prompt."""

from __future__ import annotations

import torch

from rlcore.testing import make_batch
from rlcore.toolkit import rloo_advantages
from rlcore_algorithms.rloo import RLOO


def leave_one_out(rewards: list[float]) -> list[float]:
    return [r - sum(rewards[:i] + rewards[i + 1:]) / (len(rewards) - 1) for i, r in enumerate(rewards)]


def test_by_hand_and_by_definition():
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long)),
                               torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    r = [0.3, 0.9, 0.1, 2.0, 1.0, 0.5]
    ids = torch.tensor([4, 4, 4, 9, 9, 9])
    expected = leave_one_out(r[:3]) + leave_one_out(r[3:])
    torch.testing.assert_close(rloo_advantages(torch.tensor(r), ids), torch.tensor(expected))


def test_hook_and_degenerate_groups():
    batch = make_batch(groups=3, n=2, response_len=3, lengths=[3, 1, 2, 2, 0, 3],
                       rewards=[1.0, 0.0, 0.5, 0.5, 1.0, 0.0])
    batch.group_ids = torch.tensor([0, 0, 1, 1, 2, 3])  # groups 2 and 3 have one sample each
    adv = RLOO(RLOO.Options()).advantage(batch)
    expected = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(adv, expected)
