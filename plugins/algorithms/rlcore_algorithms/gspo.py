"""GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071.
GRPO's advantage with a sequence-level importance ratio (length-normalised likelihood ratio of the
whole response), clipped per sequence with a tiny range (3e-4 / 4e-4 in the paper)."""

from __future__ import annotations

import attrs
from torch import Tensor

from rlcore import PolicyLoss, RolloutBatch, hookimpl
from rlcore.config import check_choice, check_range
from rlcore_algorithms.advantages import broadcast, grpo_advantages
from rlcore_algorithms.aggregation import AGG_MODES
from rlcore_algorithms.base import Algorithm
from rlcore_algorithms.losses import GSPOLoss
from rlcore_algorithms.options import CommonOptions, GroupNormOptions


class GSPO(Algorithm):
    """Group-relative advantages + the clipped sequence-ratio objective."""

    @attrs.define
    class Options(CommonOptions, GroupNormOptions):
        clip_low: float = attrs.field(default=3e-4, validator=check_range(0.0, 1.0))
        """Sequence ratios below 1 - clip_low are clipped."""
        clip_high: float = attrs.field(default=4e-4, validator=check_range(0.0))
        """Sequence ratios above 1 + clip_high are clipped."""
        loss_agg_mode: str = attrs.field(default="seq-mean-token-mean", validator=check_choice(*AGG_MODES))
        """The paper averages over sequences (each sequence's tokens share its ratio)."""

    @hookimpl
    def advantage(self, batch: RolloutBatch) -> Tensor:
        o = self.options
        adv = grpo_advantages(self.rewards(batch).total, batch.group_ids, o.norm_adv_by_std, o.adv_eps)
        return self.finish(batch, broadcast(adv, batch.response_mask))

    @hookimpl
    def policy_loss(self) -> PolicyLoss:
        o = self.options
        return GSPOLoss(agg=o.loss_agg_mode, clip_low=o.clip_low, clip_high=o.clip_high, **self.loss_terms())
