"""One pass of the policy over a micro-batch (loss with grad, or logprobs), shared by every trainer backend."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlcore import LossInputs, LossNorm, PolicyLoss, RolloutBatch
from rlcore.errors import TrainingError
from rlcore_backends.common.logprobs import response_logprobs


def loss_pass(model: Any, part: RolloutBatch, loss: PolicyLoss, norm: LossNorm,
              autocast: torch.autocast, keep_logits_mib: float = 0) -> tuple[Tensor, dict[str, float]]:
    """Forward a micro-batch (already trimmed and on the model's device) and apply the loss.

    Returns the loss (with grad, for the caller's `backward`) and the micro-batch's share of the metrics:
    `loss`, `entropy` (token mean over the mini-batch) and the loss's own metrics. `keep_logits_mib`: see
    `TrainOptions.keep_logits_mib`.
    """
    with autocast:
        logprobs, entropy = response_logprobs(model, *part.sequences(), part.response_ids, part.temperature,
                                              part.multimodal, entropy_grad=loss.needs_entropy,
                                              keep_logits_mib=keep_logits_mib)
    inputs = LossInputs(
        logprobs=logprobs, advantages=part.advantages, mask=part.response_mask,
        old_logprobs=part.old_logprobs, rollout_logprobs=part.rollout_logprobs, ref_logprobs=part.ref_logprobs,
        entropy=entropy if loss.needs_entropy else None)
    value, loss_metrics = loss(inputs, norm)
    metrics = {"loss": float(value.detach()),
               "entropy": float((entropy.detach() * part.response_mask).sum()) / norm.tokens}
    metrics.update({name: float(metric) for name, metric in loss_metrics.items()})
    return value, metrics


def logprobs_pass(model: Any, part: RolloutBatch, autocast: torch.autocast) -> Tensor:
    """No-grad logprobs [b, r] of a micro-batch's response tokens (already trimmed and on the model's device)."""
    with torch.no_grad(), autocast:
        return response_logprobs(model, *part.sequences(), part.response_ids, part.temperature, part.multimodal)[0]


def non_finite_error(loss: float, grad_norm: float, step: int, lr: float) -> TrainingError:
    """The error for a step whose loss or gradient norm is NaN or inf (the step is not applied)."""
    return TrainingError(
        f"non-finite loss {loss} (grad_norm {grad_norm}) at optimizer step {step}; "
        f"the step was not applied. Lower backend.lr (now {lr:g}), check that rewards and advantages "
        "are finite, or use backend.dtype=float32 if training in bfloat16.")
