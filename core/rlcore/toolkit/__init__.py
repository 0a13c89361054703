"""rlcore's public RL toolkit: the pure tensor pieces every algorithm is made of.

The built-in algorithms (`rlcore-algorithms`) are short recipes over this module, exactly as a third-party
algorithm is written; everything in `__all__` is the stable, documented API (`__version__` follows semantic
versioning: a minor version adds names, a major version may change them).

- Advantages (`advantages`): `grpo_advantages` (group mean/std), `rloo_advantages` (leave-one-out),
  `discounted_returns` + `masked_whiten` (REINFORCE++), `last_token_rewards`, `broadcast` ([B] -> [B, R]),
  `group_stats`. Groups of one and all-equal groups give an exact 0.
- Aggregation (`aggregation`): `aggregate(values, mask, mode, norm)` for the `AGG_MODES`, dividing by the
  GLOBAL counts in `rlcore.LossNorm` so micro-batch and rank splits sum to the unsplit loss; `token_mean`
  for metrics; `masked` (exact zeros outside the mask, also over inf/NaN).
- KL (`kl`): `kl_estimate` (k1, k2, k3, abs; Schulman 2020) and `KLController` (fixed or adaptive).
- Losses (`losses`): `PolicyGradientLoss`, the frame (old-policy ratio, TIS, aggregation, KL and entropy
  terms, summable metrics), and its members `ClippedSurrogateLoss` (PPO / GRPO / DAPO, dual clip),
  `GSPOLoss` (sequence ratio) and `GMPOLoss` (geometric mean).
- Shaping and filters (`shaping`): `overlong_penalty` (DAPO soft punishment), `keep_varied_groups`
  (DAPO dynamic sampling).
- The algorithm frame (`algorithm`, `options`): `Algorithm` (shaping, KL coefficient, dynamic sampling,
  step metrics, checkpoint state as hooks), `GroupRelativeAlgorithm` (adds GRPO's advantage hook), and the
  option groups `CommonOptions`, `ClipOptions`, `GroupNormOptions`.

How a policy loss is written: subclass `PolicyGradientLoss` and implement
`token_losses(log_ratio, advantages, mask) -> (loss [b, R], {name: per-token metric [b, R]})`.
`log_ratio` is log(pi / pi_old) per token, clamped to +-`LOG_RATIO_MAX` and exactly 0 outside the mask.
On-policy (one epoch, one mini-batch) the core passes no old logprobs and pi_old is pi.detach(): the
log-ratio's value is 0 and its gradient is that of log pi, so exp(log_ratio) is 1 with the REINFORCE
gradient. `advantages` are the algorithm's [b, R] advantages (0 outside the mask). The frame weights the
token losses by truncated importance sampling (`tis_cap`), aggregates them with `agg`, adds the KL and
entropy terms, and turns every per-token metric into a token mean over the whole mini-batch (so a backend
sums metrics over micro-batches). A loss that is not a per-token policy gradient implements
`rlcore.PolicyLoss.__call__(inputs, norm)` directly (see `rlcore.LossInputs`, `rlcore.LossNorm`).
"""

from rlcore.toolkit.advantages import (GroupStats, broadcast, discounted_returns, group_stats, grpo_advantages,
                                       last_token_rewards, masked_whiten, rloo_advantages)
from rlcore.toolkit.aggregation import AGG_MODES, aggregate, masked, token_mean
from rlcore.toolkit.algorithm import Algorithm, GroupRelativeAlgorithm, Rewards
from rlcore.toolkit.kl import KL_ESTIMATORS, KLController, kl_estimate
from rlcore.toolkit.losses import LOG_RATIO_MAX, ClippedSurrogateLoss, GMPOLoss, GSPOLoss, PolicyGradientLoss
from rlcore.toolkit.options import ClipOptions, CommonOptions, GroupNormOptions
from rlcore.toolkit.shaping import keep_varied_groups, overlong_penalty

__version__ = "1.0.0"

__all__ = [
    "AGG_MODES", "KL_ESTIMATORS", "LOG_RATIO_MAX",
    "Algorithm", "ClipOptions", "ClippedSurrogateLoss", "CommonOptions", "GMPOLoss", "GSPOLoss", "GroupNormOptions",
    "GroupRelativeAlgorithm", "GroupStats", "KLController", "PolicyGradientLoss", "Rewards",
    "aggregate", "broadcast", "discounted_returns", "group_stats", "grpo_advantages", "keep_varied_groups",
    "kl_estimate", "last_token_rewards", "masked", "masked_whiten", "overlong_penalty", "rloo_advantages",
    "token_mean", "__version__",
]
