"""The example algorithm `cispo`: CISPO (MiniMax, "MiniMax-M1: Scaling Test-Time Compute Efficiently with
Lightning Attention", arXiv 2506.13585), written only against rlcore's public toolkit (`rlcore.toolkit`).

CISPO clips the importance-sampling WEIGHT instead of the update: every token keeps its gradient, weighted by
sg(min(r_t, 1 + clip_high)) (a lower bound only if `clip_low` is set), with the group-normalised advantage
and token-mean aggregation: J = mean_t sg(clip(r_t)) A_t log pi(y_t).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from rlcore import PolicyLoss, hookimpl
from rlcore.config import check_range
from rlcore.toolkit import CommonOptions, GroupNormOptions, GroupRelativeAlgorithm, PolicyGradientLoss


@attrs.frozen
class CISPOLoss(PolicyGradientLoss):
    """Per token: -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * log r, whose gradient is the clipped
    weight times A times the gradient of log pi (log r = log pi - log pi_old)."""

    clip_low: float | None = None
    clip_high: float = 0.28

    def token_losses(self, log_ratio: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ratio = torch.exp(log_ratio.detach())
        low = 0.0 if self.clip_low is None else 1.0 - self.clip_low
        weight = ratio.clamp(min=low, max=1.0 + self.clip_high)
        clipped = weight != ratio
        return -weight * advantages * log_ratio, {"ratio_mean": ratio, "clip_frac": clipped}


class CISPO(GroupRelativeAlgorithm):
    """Group-normalised advantages + the clipped-weight policy gradient."""

    @attrs.define
    class Options(CommonOptions, GroupNormOptions):
        clip_low: float | None = attrs.field(default=None, validator=check_range(0.0, 1.0))
        """Weights below 1 - clip_low are raised to it; None: no lower bound (as the paper)."""
        clip_high: float = attrs.field(default=0.28, validator=check_range(0.0))
        """Weights above 1 + clip_high are cut to it."""

    @hookimpl
    def policy_loss(self) -> PolicyLoss:
        o = self.options
        return CISPOLoss(agg="token-mean", clip_low=o.clip_low, clip_high=o.clip_high, **self.loss_terms())
