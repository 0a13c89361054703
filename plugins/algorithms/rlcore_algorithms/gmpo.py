"""GMPO: Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv 2507.20673.
GRPO's advantage, but the objective maximises the geometric mean of the token ratios of a response
(exp of the mean of token log-ratios, clipped in log space), which is robust to outlier ratios and
allows the wider clip range (-0.4, 0.4). Compose with DAPO's parts through the common options, as in
the GMPO + DAPO math recipe: `dynamic_sampling=true`, `overlong_buffer=...`."""

from __future__ import annotations

import attrs

from rlcore import PolicyLoss, hookimpl
from rlcore.config import check_range
from rlcore.toolkit import CommonOptions, GMPOLoss, GroupNormOptions, GroupRelativeAlgorithm


class GMPO(GroupRelativeAlgorithm):
    """Group-relative advantages + the geometric-mean sequence objective."""

    @attrs.define
    class Options(CommonOptions, GroupNormOptions):
        clip_low: float = attrs.field(default=0.4, validator=check_range(0.0))
        """Token log-ratios below -clip_low are clipped (pessimistically, for negative advantages)."""
        clip_high: float = attrs.field(default=0.4, validator=check_range(0.0))
        """Token log-ratios above clip_high are clipped (pessimistically, for positive advantages)."""

    @hookimpl
    def policy_loss(self) -> PolicyLoss:
        return GMPOLoss(clip_low=self.options.clip_low, clip_high=self.options.clip_high, **self.loss_terms())
