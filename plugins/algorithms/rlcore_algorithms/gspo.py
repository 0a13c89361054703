"""GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071.
GRPO's advantage with a sequence-level importance ratio (length-normalised likelihood ratio of the
whole response), clipped per sequence with a tiny range (3e-4 / 4e-4 in the paper)."""

from __future__ import annotations

import attrs

from rlcore import PolicyLoss, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.toolkit import AGG_MODES, CommonOptions, GroupNormOptions, GroupRelativeAlgorithm, GSPOLoss


class GSPO(GroupRelativeAlgorithm):
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
    def policy_loss(self) -> PolicyLoss:
        o = self.options
        return GSPOLoss(agg=o.loss_agg_mode, clip_low=o.clip_low, clip_high=o.clip_high, **self.loss_terms())
