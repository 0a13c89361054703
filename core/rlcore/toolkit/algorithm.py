"""The `Algorithm` base: what every algorithm shares (reward shaping: DAPO overlong, KL in the reward; the
KL coefficient; dynamic sampling; per-step metrics; checkpoint state). An algorithm adds its `advantage` and
`policy_loss` hooks on top, or takes the group-normalised advantage from `GroupRelativeAlgorithm`.

Step metrics (`step_metrics` hook, as `algo/<name>`): kl_coef (the coefficient used this step) and, when
active, kl_ref_measured (KL of the sampling policy to the reference; it steers an adaptive coefficient),
overlong_penalty_mean, overlong_frac and truncated_masked_frac. The core logs the advantage statistics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcore import RolloutBatch, hookimpl
from rlcore.toolkit.advantages import broadcast, grpo_advantages
from rlcore.toolkit.kl import KLController, kl_estimate
from rlcore.toolkit.losses import ClippedSurrogateLoss
from rlcore.toolkit.shaping import keep_varied_groups, overlong_penalty
from rlcore.toolkit.tis import settle_tis_cap


@attrs.frozen
class Rewards:
    """Shaped rewards of a batch: the outcome (task reward + overlong penalty) and the KL penalty."""

    outcome: Tensor
    """[B] task reward plus overlong shaping."""
    kl_penalty: Tensor
    """[B, R] kl_coef * KL to the reference on loss tokens (zeros unless the KL is in the reward)."""

    @property
    def total(self) -> Tensor:
        """[B] the sequence reward an outcome advantage sees: outcome minus the summed KL penalty."""
        return self.outcome - self.kl_penalty.sum(-1)


class Algorithm:
    """Base of the algorithm plugins: shared hooks and helpers; subclasses implement the loss and advantage."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.kl = KLController(options.kl_coef, options.kl_target, options.kl_horizon)
        self.response_budget = options.max_response_length
        self.last_metrics: dict[str, float] = {}
        """Metrics of the latest `advantage` call, handed out (and cleared) by `step_metrics`."""

    @hookimpl
    def setup(self, ctx: Any) -> None:
        """Take the response budget for overlong shaping from the run's sampling options if not set, and settle
        `tis_cap: auto` as the run's config settled it (`rlcore run` and `Trainer.setup` settle it), or from the
        config's precisions where it was not settled."""
        if not self.response_budget:
            self.response_budget = int((ctx.config.get("sampling") or {}).get("max_new_tokens") or 0)
        if getattr(self.options, "tis_cap", None) == "auto":
            settled = (ctx.config.get("algo") or {}).get("tis_cap", "auto")
            self.options = attrs.evolve(self.options,
                                        tis_cap=settle_tis_cap(ctx.config) if settled == "auto" else settled)

    @hookimpl
    def keep_groups(self, batch: RolloutBatch) -> Tensor | None:
        """Dynamic sampling: False for the groups without reward variance; None when the option is off."""
        if not self.options.dynamic_sampling:
            return None
        return keep_varied_groups(batch.rewards, batch.group_ids)

    @hookimpl
    def step_metrics(self) -> dict[str, float]:
        """This step's shaping and KL numbers as `algo/<name>` (the core logs the advantage statistics)."""
        metrics, self.last_metrics = self.last_metrics, {}
        return {f"algo/{k}": v for k, v in metrics.items()}

    @hookimpl
    def save_state(self, directory: Path) -> None:
        """Keep the (possibly adapted) KL coefficient across a resume."""
        (directory / "algo.json").write_text(json.dumps({"kl_coef": self.kl.value}))

    @hookimpl
    def load_state(self, directory: Path) -> None:
        """Restore what `save_state` wrote."""
        path = directory / "algo.json"
        if path.is_file():
            self.kl.value = float(json.loads(path.read_text())["kl_coef"])

    def loss_terms(self) -> dict[str, Any]:
        """The KL, entropy and TIS arguments of the `PolicyGradientLoss` (the KL controller is shared, so
        a loss made once at setup sees the coefficient adapt and be restored from a checkpoint). A `tis_cap`
        still `auto` (an algorithm never set up in a run) is off, as for a run whose precisions are unknown."""
        o = self.options
        return {"kl": self.kl, "kl_estimator": o.kl_estimator, "kl_in_reward": o.kl_mode == "reward",
                "entropy_coef": o.entropy_coef, "tis_cap": None if o.tis_cap == "auto" else o.tis_cap}

    def clipped_surrogate(self) -> ClippedSurrogateLoss:
        """PPO's clipped surrogate configured by `ClipOptions`, with this algorithm's KL, entropy and TIS terms."""
        o = self.options
        return ClippedSurrogateLoss(agg=o.loss_agg_mode, clip_low=o.clip_low, clip_high=o.clip_high,
                                    dual_clip=o.dual_clip, **self.loss_terms())

    def rewards(self, batch: RolloutBatch) -> Rewards:
        """Shape the batch's rewards: mask truncated responses (if asked), add the overlong penalty, and
        measure the KL to the reference, as a reward penalty when `kl_mode=reward`."""
        if batch.rewards is None:
            raise ValueError("advantage needs batch.rewards; the task's score hook must run first")
        self.last_metrics = {"kl_coef": self.kl.value}
        if self.options.mask_truncated:
            batch.response_mask = batch.response_mask * ~batch.truncated[:, None].to(batch.response_mask.device)
            self.last_metrics["truncated_masked_frac"] = batch.truncated.float().mean().item()
        return Rewards(outcome=batch.rewards.float() + self._overlong(batch), kl_penalty=self._kl_penalty(batch))

    def _overlong(self, batch: RolloutBatch) -> Tensor | float:
        """DAPO's soft overlong punishment [B], or 0 when off."""
        o = self.options
        buffer = self.response_budget // 5 if o.overlong_buffer is None else o.overlong_buffer
        if buffer <= 0:
            return 0.0
        if not self.response_budget:
            raise ValueError("overlong_buffer needs the response budget: set the algorithm option "
                             "max_response_length (a run takes it from sampling.max_new_tokens)")
        penalty = overlong_penalty(batch.response_lengths, self.response_budget, buffer, o.overlong_penalty)
        self.last_metrics["overlong_penalty_mean"] = penalty.mean().item()
        self.last_metrics["overlong_frac"] = (penalty < 0).float().mean().item()
        return penalty.to(batch.rewards.device)

    def _kl_penalty(self, batch: RolloutBatch) -> Tensor:
        """kl_coef * per-token KL of the sampling policy to the reference [B, R] when the KL is in the
        reward (zeros otherwise); the measured KL also steers an adaptive coefficient."""
        mask = batch.response_mask
        penalty = torch.zeros_like(mask, dtype=torch.float32)
        in_reward = self.options.kl_mode == "reward"
        if self.kl.value <= 0 or (batch.ref_logprobs is None and not in_reward):
            return penalty
        if batch.ref_logprobs is None:
            raise ValueError("kl_mode=reward needs batch.ref_logprobs; the backend computes them when the "
                             "policy loss says needs_ref_logprobs")
        policy = batch.rollout_logprobs if batch.old_logprobs is None else batch.old_logprobs
        kl = kl_estimate(policy, batch.ref_logprobs, self.options.kl_estimator).where(mask > 0, 0.0)
        lengths = mask.sum(-1)
        per_sequence = (kl.sum(-1) / lengths.clamp(min=1))[lengths > 0]
        measured = per_sequence.mean().item() if per_sequence.numel() else 0.0
        if in_reward:
            penalty = self.kl.value * kl
        self.last_metrics["kl_ref_measured"] = measured
        self.kl.update(measured, len(batch))
        return penalty

    def finish(self, batch: RolloutBatch, advantages: Tensor) -> Tensor:
        """The advantages with exact zeros outside the (possibly narrowed) loss mask."""
        return advantages.where(batch.response_mask > 0, 0.0)



class GroupRelativeAlgorithm(Algorithm):
    """An `Algorithm` with the group-normalised advantage (GRPO, GMPO, GSPO, DAPO, Dr.GRPO): the shaped
    reward minus its group's mean, divided by the group's std unless `norm_adv_by_std` is false, on every
    loss token. Its options need `GroupNormOptions`."""

    @hookimpl
    def advantage(self, batch: RolloutBatch) -> Tensor:
        o = self.options
        adv = grpo_advantages(self.rewards(batch).total, batch.group_ids, o.norm_adv_by_std, o.adv_eps)
        return self.finish(batch, broadcast(adv, batch.response_mask))
