"""GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
Models", arXiv 2402.03300. Advantage (r - group mean) / (group std + eps) on every response token; the
clipped surrogate loss."""

from __future__ import annotations

import attrs

from rlcore import PolicyLoss, hookimpl
from rlcore.toolkit import ClipOptions, GroupNormOptions, GroupRelativeAlgorithm


class GRPO(GroupRelativeAlgorithm):
    """Group-relative advantages + PPO clipped surrogate (dual clip for negative advantages)."""

    @attrs.define
    class Options(ClipOptions, GroupNormOptions):
        """Clipped-surrogate, group-normalisation and common options."""

    @hookimpl
    def policy_loss(self) -> PolicyLoss:
        return self.clipped_surrogate()
