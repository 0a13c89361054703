"""Option groups shared by the algorithms; each algorithm's `Options` extends one and may change defaults."""

from __future__ import annotations

from typing import Literal

import attrs

from rlcore.config import check_choice, check_range
from rlcore.toolkit.aggregation import AGG_MODES
from rlcore.toolkit.kl import KL_ESTIMATORS


@attrs.define
class CommonOptions:
    """KL, entropy, TIS and DAPO's shaping and filtering: every algorithm accepts these."""

    kl_coef: float = attrs.field(default=0.0, validator=check_range(0.0))
    """KL-to-reference coefficient; 0 means no KL term and no reference model is loaded."""
    kl_estimator: str = attrs.field(default="k3", validator=check_choice(*KL_ESTIMATORS))
    """k1 (log-ratio), k2 (half squared log-ratio), k3 (low-variance, non-negative) or abs."""
    kl_mode: str = attrs.field(default="loss", validator=check_choice("loss", "reward"))
    """Where the KL enters: a loss term, or a per-token penalty subtracted from the reward."""
    kl_target: float | None = attrs.field(default=None, validator=check_range(1e-9))
    """Adaptive KL (Ziegler et al. 2019, arXiv 1909.08593): steer the coefficient so the measured KL approaches
    this value; None keeps it fixed."""
    kl_horizon: int = attrs.field(default=10000, validator=check_range(1))
    """Adaptive KL: samples over which the coefficient may change by up to 20%."""
    entropy_coef: float = attrs.field(default=0.0, validator=check_range(0.0))
    """Entropy bonus coefficient (0: the backend computes no entropy)."""
    tis_cap: float | Literal["auto"] | None = attrs.field(default="auto", validator=check_range(1.0, auto=True))
    """Truncated importance sampling: weight tokens by min(pi_trainer / pi_rollout, tis_cap); None: off; auto: 2
    where the rollout's and the trainer's precisions do not agree (anything but float32 or bfloat16_matched on
    both sides), else off (`rlcore.toolkit.tis`)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal; the core samples more prompts to refill the batch."""
    overlong_buffer: int | None = attrs.field(default=0, validator=check_range(0))
    """DAPO soft overlong punishment over the last this-many tokens of the budget; 0: off; None: a fifth
    of the budget, rounded down (the paper's 4096 of 20480)."""
    overlong_penalty: float = attrs.field(default=1.0, validator=check_range(0.0))
    """Penalty at the full budget (the paper's factor; the reward falls linearly to -this)."""
    mask_truncated: bool = False
    """DAPO overlong filtering: truncated responses are masked out of the loss."""
    max_response_length: int = attrs.field(default=0, validator=check_range(0))
    """Response budget for overlong shaping; 0 takes `sampling.max_new_tokens` from the run config."""


@attrs.define
class ClipOptions(CommonOptions):
    """The clipped surrogate's options, on top of the common ones."""

    clip_low: float = attrs.field(default=0.2, validator=check_range(0.0, 1.0))
    """Ratios below 1 - clip_low are clipped (for negative advantages)."""
    clip_high: float = attrs.field(default=0.2, validator=check_range(0.0))
    """Ratios above 1 + clip_high are clipped (for positive advantages); DAPO's clip-higher raises it."""
    dual_clip: float | None = attrs.field(default=3.0, validator=check_range(1.0))
    """Dual clip: for negative advantages the loss is capped at -A * dual_clip; None: off."""
    loss_agg_mode: str = attrs.field(default="token-mean", validator=check_choice(*AGG_MODES))
    """token-mean, seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm."""


@attrs.define(slots=False)
class GroupNormOptions:
    """GRPO's group normalisation of the advantage, for the algorithms built on it (a mixin: no slots)."""

    norm_adv_by_std: bool = True
    """Divide by the group std (unbiased); False keeps only the group-mean baseline (as Dr.GRPO)."""
    adv_eps: float = attrs.field(default=1e-6, validator=check_range(0.0))
    """Added to the group std before dividing."""
