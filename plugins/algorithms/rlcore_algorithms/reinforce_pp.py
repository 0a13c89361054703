"""REINFORCE++: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
Models", arXiv 2501.03262. No critic: token returns (the outcome reward at the last token, minus a
per-token KL penalty when `kl_mode=reward`) whitened over the whole batch; `baseline=true` is
REINFORCE++-baseline: subtract the group mean reward first, then whiten."""

from __future__ import annotations

import attrs
from torch import Tensor

from rlcore import PolicyLoss, RolloutBatch, hookimpl
from rlcore.config import check_range
from rlcore.toolkit import (Algorithm, broadcast, ClipOptions, discounted_returns, grpo_advantages,
                            last_token_rewards, masked_whiten)


class ReinforcePP(Algorithm):
    """Batch-whitened returns (optionally after a group-mean baseline) + the clipped surrogate."""

    @attrs.define
    class Options(ClipOptions):
        baseline: bool = False
        """REINFORCE++-baseline: subtract each group's mean reward before whitening over the batch."""
        gamma: float = attrs.field(default=1.0, validator=check_range(0.0, 1.0))
        """Discount of the token returns (without baseline); 1 as in the paper."""

    @hookimpl
    def advantage(self, batch: RolloutBatch) -> Tensor:
        rewards = self.rewards(batch)
        mask = batch.response_mask  # read after shaping, which may mask truncated responses out
        if self.options.baseline:
            centred = grpo_advantages(rewards.total, batch.group_ids, norm_by_std=False)
            returns = broadcast(centred, mask)
        else:
            token_rewards = last_token_rewards(rewards.outcome, mask) - rewards.kl_penalty
            returns = discounted_returns(token_rewards, mask, self.options.gamma)
        return self.finish(batch, masked_whiten(returns, mask))

    @hookimpl
    def policy_loss(self) -> PolicyLoss:
        return self.clipped_surrogate()
