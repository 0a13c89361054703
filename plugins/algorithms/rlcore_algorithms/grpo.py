"""GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
Models", arXiv 2402.03300. Advantage (r - group mean) / (group std + eps) on every response token; the
clipped surrogate loss."""

from __future__ import annotations

import attrs
from torch import Tensor

from rlcore import PolicyLoss, RolloutBatch, hookimpl
from rlcore_algorithms.advantages import broadcast, grpo_advantages
from rlcore_algorithms.base import Algorithm
from rlcore_algorithms.losses import ClippedSurrogateLoss
from rlcore_algorithms.options import ClipOptions, GroupNormOptions


class GRPO(Algorithm):
    """Group-relative advantages + PPO clipped surrogate (dual clip for negative advantages)."""

    @attrs.define
    class Options(ClipOptions, GroupNormOptions):
        """Clipped-surrogate, group-normalisation and common options."""

    @hookimpl
    def advantage(self, batch: RolloutBatch) -> Tensor:
        o = self.options
        adv = grpo_advantages(self.rewards(batch).total, batch.group_ids, o.norm_adv_by_std, o.adv_eps)
        return self.finish(batch, broadcast(adv, batch.response_mask))

    @hookimpl
    def policy_loss(self) -> PolicyLoss:
        o = self.options
        return ClippedSurrogateLoss(agg=o.loss_agg_mode, clip_low=o.clip_low, clip_high=o.clip_high,
                                    dual_clip=o.dual_clip, **self.loss_terms())
