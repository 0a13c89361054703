"""Policy losses: the clipped surrogate (PPO / GRPO / DAPO), GSPO's sequence ratio and GMPO's geometric mean.

`PolicyGradientLoss` is the shared frame: ratio to the old policy, truncated importance sampling (TIS),
aggregation with global counts, KL-to-reference and entropy terms, summable metrics. A subclass only says
how a token's policy-gradient loss follows from its log-ratio and advantage.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor

from rlcore.types import LossInputs, LossNorm, PolicyLoss
from rlcore.toolkit.aggregation import aggregate, masked, token_mean
from rlcore.toolkit.kl import KLController, kl_estimate

LOG_RATIO_MAX = 20.0
"""Log-ratios are clamped to +-20 so exp() stays finite for tokens the policy has moved far away from."""


@attrs.frozen
class PolicyGradientLoss(PolicyLoss):
    """pg_loss + kl_coef * kl_loss - entropy_coef * entropy_loss, each aggregated by `agg`."""

    agg: str = "token-mean"
    kl: KLController = attrs.field(factory=lambda: KLController(0.0))
    """The KL coefficient, shared with the algorithm and read at every call (it may adapt between steps)."""
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    """The KL is a reward penalty (applied in `advantage`), not a loss term; reference logprobs still needed."""
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    """Truncated importance sampling: weight tokens by min(pi_old / pi_rollout, cap); None: off."""

    @property
    def kl_coef(self) -> float:
        """Current coefficient of the KL-to-reference loss term (0: no term)."""
        return 0.0 if self.kl_in_reward else self.kl.value

    @property
    def needs_ref_logprobs(self) -> bool:  # type: ignore[override]
        """The backend loads the reference model only when the KL coefficient is positive."""
        return self.kl.value > 0

    @property
    def needs_entropy(self) -> bool:  # type: ignore[override]
        """The backend computes the entropy only for an entropy bonus."""
        return self.entropy_coef > 0

    def token_losses(self, log_ratio: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token policy-gradient loss [b, R] and per-token metrics (clip flags, ratio) to average."""
        raise NotImplementedError

    def __call__(self, inputs: LossInputs, norm: LossNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """This micro-batch's share of the mini-batch loss and summable metrics (see `PolicyLoss`)."""
        mask = inputs.mask
        old = inputs.logprobs.detach() if inputs.old_logprobs is None else inputs.old_logprobs
        log_ratio = masked(inputs.logprobs - old, mask).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
        pg, token_metrics = self.token_losses(log_ratio, masked(inputs.advantages, mask), mask)
        metrics = {name: token_mean(v.float(), mask, norm) for name, v in token_metrics.items()}
        metrics["approx_kl"] = token_mean(kl_estimate(old, inputs.logprobs.detach(), "k3"), mask, norm)
        if self.tis_cap is not None:
            if inputs.rollout_logprobs is None:
                raise ValueError("tis_cap is set but the backend passed no rollout_logprobs")
            weight = torch.exp(masked(old - inputs.rollout_logprobs, mask).clamp(max=math.log(self.tis_cap)))
            pg = pg * weight
            metrics["tis_weight_mean"] = token_mean(weight, mask, norm)
        loss = aggregate(pg, mask, self.agg, norm)
        metrics["pg_loss"] = loss.detach()
        kl_coef = self.kl_coef
        if inputs.ref_logprobs is not None:
            metrics["kl_ref"] = token_mean(kl_estimate(inputs.logprobs, inputs.ref_logprobs, "k3"), mask, norm)
            if kl_coef > 0:
                kl_loss = aggregate(kl_estimate(inputs.logprobs, inputs.ref_logprobs, self.kl_estimator), mask,
                                    self.agg, norm)
                loss = loss + kl_coef * kl_loss
                metrics["kl_loss"] = kl_loss.detach()
        elif kl_coef > 0:
            raise ValueError("kl_coef > 0 needs ref_logprobs; the backend must pass them (needs_ref_logprobs)")
        if inputs.entropy is not None:
            entropy = aggregate(inputs.entropy, mask, self.agg, norm)
            loss = loss - self.entropy_coef * entropy
            metrics["entropy_loss"] = entropy.detach()
        elif self.entropy_coef > 0:
            raise ValueError("entropy_coef > 0 needs entropy; the backend must pass it (needs_entropy)")
        return loss, metrics


@attrs.frozen
class ClippedSurrogateLoss(PolicyGradientLoss):
    """PPO's clipped surrogate with asymmetric clip (DAPO's clip-higher) and dual clip.

    loss = max(-A r, -A clip(r, 1 - low, 1 + high)), and for A < 0 at most -A c (Ye et al. 2020, dual clip).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0

    def token_losses(self, log_ratio: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ratio = torch.exp(log_ratio)
        loss = torch.maximum(-advantages * ratio,
                             -advantages * ratio.clamp(1 - self.clip_low, 1 + self.clip_high))
        high = (advantages > 0) & (ratio > 1 + self.clip_high)
        low = (advantages < 0) & (ratio < 1 - self.clip_low)
        metrics = {"ratio_mean": ratio, "clip_frac_high": high, "clip_frac_low": low}
        clipped = high | low
        if self.dual_clip is not None:
            dual = (advantages < 0) & (ratio > self.dual_clip)
            loss = torch.where(dual, -advantages * self.dual_clip, loss)
            metrics["clip_frac_dual"] = dual
            clipped = clipped | dual
        metrics["clip_frac"] = clipped
        return loss, metrics


@attrs.frozen
class GSPOLoss(PolicyGradientLoss):
    """GSPO (arXiv 2507.18071): the importance ratio of a sequence is the geometric mean of its token
    ratios, s = exp(mean_t log r_t), clipped as in PPO. Tokens carry s with the gradient of their own
    logprob (s_t = sg[s] pi_t / sg[pi_t]), so token advantages are allowed."""

    agg: str = "seq-mean-token-mean"
    clip_low: float = 3e-4
    clip_high: float = 4e-4

    def token_losses(self, log_ratio: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        seq_log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        token_log_ratio = log_ratio - log_ratio.detach() + seq_log_ratio.detach()
        ratio = torch.exp(token_log_ratio.clamp(max=10.0))
        loss = torch.maximum(-advantages * ratio,
                             -advantages * ratio.clamp(1 - self.clip_low, 1 + self.clip_high))
        high = (advantages > 0) & (ratio > 1 + self.clip_high)
        low = (advantages < 0) & (ratio < 1 - self.clip_low)
        return loss, {"ratio_mean": ratio, "clip_frac_high": high, "clip_frac_low": low, "clip_frac": high | low}


@attrs.frozen
class GMPOLoss(PolicyGradientLoss):
    """GMPO (arXiv 2507.20673): maximise the geometric mean of token ratios times the advantage.

    Token log-ratios are clipped to [-clip_low, clip_high] pessimistically (min for A > 0, max for A < 0),
    the sequence ratio is exp(mean of them), and loss = -A * ratio averaged over sequences: each token
    carries its sequence's value and `seq-mean-token-mean` aggregation takes the sequence mean.
    """

    agg: str = "seq-mean-token-mean"
    clip_low: float = 0.4
    clip_high: float = 0.4

    def token_losses(self, log_ratio: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        sign = torch.sign(advantages)
        clamped = log_ratio.clamp(-self.clip_low, self.clip_high)
        pessimistic = sign * torch.minimum(sign * log_ratio, sign * clamped)
        length = mask.sum(-1, keepdim=True).clamp(min=1)
        seq_ratio = torch.exp(masked(pessimistic, mask).sum(-1, keepdim=True) / length)
        seq_advantage = advantages.sum(-1, keepdim=True) / length
        loss = (-seq_advantage * seq_ratio).expand_as(log_ratio)
        high = (advantages > 0) & (log_ratio > self.clip_high)
        low = (advantages < 0) & (log_ratio < -self.clip_low)
        return loss, {"ratio_mean": seq_ratio.expand_as(log_ratio).detach(), "clip_frac_high": high,
                      "clip_frac_low": low, "clip_frac": high | low}
