"""One pass of the policy over a micro-batch (loss with grad, or logprobs), shared by every trainer backend."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlcore import LossInputs, LossNorm, PolicyLoss, RolloutBatch
from rlcore.errors import TrainingError
from rlcore.metrics import mismatch_parts
from rlcore_backends.common.logprobs import response_logprobs


def loss_pass(model: Any, part: RolloutBatch, loss: PolicyLoss, norm: LossNorm, autocast: torch.autocast,
              keep_logits_mib: float = 0, mismatch: bool = False, share_prompts: bool = True
              ) -> tuple[Tensor, dict[str, float]]:
    """Forward a micro-batch (already trimmed and on the model's device) and apply the loss.

    Returns the loss (with grad, for the caller's `backward`) and the micro-batch's share of the metrics
    (fold them with `rlcore.metrics.combine`): `loss`, `entropy` (token mean over the mini-batch), the
    loss's own metrics and, with `mismatch` (an update of one optimizer step), the rollout-vs-trainer
    mismatch (`on_policy_mismatch`). `keep_logits_mib` and `share_prompts`: see `TrainOptions`.
    """
    with autocast:
        logprobs, entropy = response_logprobs(model, *part.sequences(), part.response_ids, part.temperature,
                                              part.multimodal, entropy_grad=loss.needs_entropy,
                                              keep_logits_mib=keep_logits_mib, share_prompts=share_prompts)
    inputs = LossInputs(
        logprobs=logprobs, advantages=part.advantages, mask=part.response_mask,
        old_logprobs=part.old_logprobs, rollout_logprobs=part.rollout_logprobs, ref_logprobs=part.ref_logprobs,
        entropy=entropy if loss.needs_entropy else None)
    value, loss_metrics = loss(inputs, norm)
    metrics = {"loss": float(value.detach()),
               "entropy": float((entropy.detach() * part.response_mask).sum()) / norm.tokens}
    metrics.update({name: float(metric) for name, metric in loss_metrics.items()})
    if mismatch:
        metrics.update(on_policy_mismatch(logprobs, part, norm))
    return value, metrics


def on_policy_mismatch(logprobs: Tensor, part: RolloutBatch, norm: LossNorm) -> dict[str, float]:
    """This micro-batch's share of `mismatch/*`, for an update of one optimizer step on an on-policy batch
    (no `old_logprobs`): every micro-batch's forward then runs on the weights before the step, those the
    loop would otherwise score in an extra no-grad pass. Call it from the update's forward only then."""
    if part.old_logprobs is not None or part.rollout_logprobs is None:
        return {}
    return mismatch_parts(logprobs, part.rollout_logprobs, part.response_mask, norm.tokens)


def logprobs_pass(model: Any, part: RolloutBatch, autocast: torch.autocast, share_prompts: bool = True) -> Tensor:
    """No-grad logprobs [b, r] of a micro-batch's response tokens (already trimmed and on the model's device)."""
    with torch.no_grad(), autocast:
        return response_logprobs(model, *part.sequences(), part.response_ids, part.temperature, part.multimodal,
                                 share_prompts=share_prompts)[0]


def non_finite_error(loss: float, grad_norm: float, step: int, lr: float) -> TrainingError:
    """The error for a step whose loss or gradient norm is NaN or inf (the step is not applied)."""
    return TrainingError(
        f"non-finite loss {loss} (grad_norm {grad_norm}) at optimizer step {step}; "
        f"the step was not applied. Lower backend.lr (now {lr:g}), check that rewards and advantages "
        "are finite, or use backend.dtype=float32 if training in bfloat16.")
