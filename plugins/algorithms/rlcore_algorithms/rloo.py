"""RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
Human Feedback in LLMs", arXiv 2402.14740 (baseline of Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
Baseline for Free!"). Each response's baseline is the mean reward of the other responses to its prompt."""

from __future__ import annotations

import attrs
from torch import Tensor

from rlcore import PolicyLoss, RolloutBatch, hookimpl
from rlcore.toolkit import Algorithm, broadcast, ClipOptions, rloo_advantages


class RLOO(Algorithm):
    """Leave-one-out advantages + the clipped surrogate (plain REINFORCE when on-policy)."""

    @attrs.define
    class Options(ClipOptions):
        """Clipped-surrogate and common options."""

    @hookimpl
    def advantage(self, batch: RolloutBatch) -> Tensor:
        adv = rloo_advantages(self.rewards(batch).total, batch.group_ids)
        return self.finish(batch, broadcast(adv, batch.response_mask))

    @hookimpl
    def policy_loss(self) -> PolicyLoss:
        return self.clipped_surrogate()
