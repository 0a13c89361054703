"""Dr.GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783.
GRPO without its two biases: no division by the group std (question-difficulty bias), and token sums
divided by a constant (the response budget) instead of each response's length (length bias)."""

from __future__ import annotations

import attrs

from rlcore.config import check_choice
from rlcore.toolkit import AGG_MODES
from rlcore_algorithms.grpo import GRPO


class DrGRPO(GRPO):
    """GRPO with the advantage r - group mean and `seq-mean-token-sum-norm` aggregation."""

    @attrs.define
    class Options(GRPO.Options):
        norm_adv_by_std: bool = False
        """Dr.GRPO keeps only the group-mean baseline."""
        loss_agg_mode: str = attrs.field(default="seq-mean-token-sum-norm", validator=check_choice(*AGG_MODES))
        """Token sums over sequences / (sequences x max response length): no length bias."""
