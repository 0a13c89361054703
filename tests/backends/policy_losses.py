"""Policy losses for backend tests, in their own module so worker processes can unpickle them by name."""

from __future__ import annotations

import torch
from torch import Tensor

from rlcore import LossInputs, LossNorm, PolicyLoss


class TokenMeanPG(PolicyLoss):
    """-(ratio * advantage), token-mean over the mini-batch: the simplest loss that depends on every token."""

    def __call__(self, inputs: LossInputs, norm: LossNorm) -> tuple[Tensor, dict[str, Tensor]]:
        old = inputs.old_logprobs if inputs.old_logprobs is not None else inputs.logprobs.detach()
        ratio = torch.exp(inputs.logprobs - old)
        loss = -(ratio * inputs.advantages * inputs.mask).sum() / norm.tokens
        return loss, {"pg/ratio": (ratio.detach() * inputs.mask).sum() / norm.tokens}


class NeedsRef(TokenMeanPG):
    needs_ref_logprobs = True


class SequenceMeanPG(PolicyLoss):
    """-(advantage), mean over each sequence's tokens then over the mini-batch's sequences (uses `norm.sequences`)."""

    def __call__(self, inputs: LossInputs, norm: LossNorm) -> tuple[Tensor, dict[str, Tensor]]:
        ratio = torch.exp(inputs.logprobs - inputs.logprobs.detach())
        per_token = ratio * inputs.advantages * inputs.mask
        per_sequence = per_token.sum(-1) / inputs.mask.sum(-1).clamp(min=1)
        return -per_sequence.sum() / norm.sequences, {}
