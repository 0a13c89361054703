"""KL estimators between a sampling policy and another, and the (fixed or adaptive) KL coefficient.

Estimators follow Schulman, "Approximating KL Divergence" (2020): with samples from p and
log r = log q - log p, k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r (unbiased, never negative).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
K3_MAX = 10.0
"""k3 is capped here (as verl does) so a single far-off token cannot blow up the loss."""


def kl_estimate(sample_logprobs: Tensor, other_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(sampler || other) from logprobs of tokens drawn from the sampler."""
    log_ratio = (other_logprobs - sample_logprobs).clamp(-20.0, 20.0)
    if estimator == "k1":
        return -log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return (torch.expm1(log_ratio) - log_ratio).clamp(max=K3_MAX)
    raise ValueError(f"KL estimator {estimator!r} is unknown; choose one of {', '.join(KL_ESTIMATORS)}")


@attrs.define
class KLController:
    """The KL coefficient: fixed, or adapted towards `target` (Ziegler et al. 2019, arXiv 1909.08593).

    Adaptive update after each step: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * samples / horizon.
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, samples: int) -> None:
        """Move the coefficient after a step that measured `kl` on `samples` sequences (no-op if fixed)."""
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * samples / self.horizon
