"""Every algorithm, hooks and loss together, improves a tiny tabular policy on a bandit in a few steps."""

from __future__ import annotations

import pytest
import torch

from rlcore import plugins
from rlcore.testing import make_batch
from rlcore.types import LossInputs, LossNorm

ALGOS = ["grpo", "drgrpo", "gmpo", "dapo", "gspo", "rloo", "reinforce_pp"]
VOCAB, LENGTH, GROUPS, N = 4, 3, 4, 4


def sample(logits: torch.Tensor, g: torch.Generator):
    """GROUPS x N responses of LENGTH tokens from a position-wise categorical policy; reward = share of 0s."""
    probs = torch.softmax(logits, -1).detach()
    tokens = torch.stack([torch.multinomial(probs[t], GROUPS * N, replacement=True, generator=g)
                          for t in range(LENGTH)], dim=1)
    batch = make_batch(groups=GROUPS, n=N, response_len=LENGTH, lengths=[LENGTH] * (GROUPS * N),
                       rewards=(tokens == 0).float().mean(-1))
    batch.response_ids = tokens
    return batch


def logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1)[torch.arange(LENGTH), tokens]


@pytest.mark.parametrize("name", ALGOS)
def test_learns_a_bandit(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    algo = plugins.instantiate(plugins.load("algo", name), {"kl_coef": 0.01} if name == "grpo" else None, "algo")
    logits = torch.zeros(LENGTH, VOCAB, requires_grad=True)
    ref = torch.zeros(LENGTH, VOCAB)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(25):
        batch = sample(logits, g)
        keep = algo.keep_groups(batch)
        if keep is not None:
            batch = batch.select(torch.nonzero(keep[batch.group_ids]).flatten())
            if len(batch) == 0:
                continue
        loss = algo.policy_loss()
        batch.rollout_logprobs = logprobs(logits, batch.response_ids).detach()
        if loss.needs_ref_logprobs:
            batch.ref_logprobs = logprobs(ref, batch.response_ids)
        adv = algo.advantage(batch)
        old = batch.rollout_logprobs
        mask = batch.response_mask
        for half in (slice(0, len(batch) // 2), slice(len(batch) // 2, len(batch))):  # 2 mini-batches
            opt.zero_grad()
            m = mask[half]
            norm = LossNorm(float(m.sum()), float((m.sum(-1) > 0).sum()), LENGTH)
            value, _ = loss(LossInputs(logprobs=logprobs(logits, batch.response_ids[half]), advantages=adv[half],
                                       mask=m, old_logprobs=old[half],
                                       ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[half]),
                            norm)
            value.backward()
            opt.step()
    assert torch.softmax(logits, -1)[:, 0].mean() > 0.7  # from 0.25
