"""A rollout micro-batch as GPTModel inputs: each row's real tokens moved to the start of the row.

Megatron's rotary embedding numbers positions 0..S-1 in every row and its attention is causal, so a
left-padded prompt would shift every position. Instead each row is prompt (without its left padding)
then response then padding: causal attention alone is then exact for every real token, exactly as
Hugging Face's attention mask with position ids counted over real tokens.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from rlcore.types import RolloutBatch


@attrs.frozen
class MicroInputs:
    """One micro-batch ready for GPTModel, and the rows it came from (responses, masks, advantages)."""

    tokens: Tensor
    """[b, S] long: prompt tokens, response tokens, then padding (id 0)."""
    position_ids: Tensor
    """[b, S] long: 0..S-1."""
    attention_mask: Tensor
    """[1, 1, S, S] bool, True above the diagonal (masked): causal attention."""
    logit_index: Tensor
    """[b, R] long: the position whose logits predict response token t."""
    part: RolloutBatch
    """The micro-batch's rows as `micro_batches.take` cut them."""


def pack(part: RolloutBatch, multiple: int = 1) -> MicroInputs:
    """Left-align each row of `part` (prompt left-padded to P, response right-padded to R); the sequence
    length is rounded up to `multiple` (the tensor-parallel size under sequence parallelism)."""
    ids = torch.cat([part.prompt_ids, part.response_ids], dim=1)
    P, R = part.prompt_ids.shape[1], part.response_ids.shape[1]
    prompt_lens = part.prompt_mask.sum(-1)
    width = int(prompt_lens.max()) + R
    width = -(-width // multiple) * multiple
    cols = torch.arange(width, device=ids.device)
    source = cols[None, :] + (P - prompt_lens)[:, None]
    tokens = ids.gather(1, source.clamp(max=P + R - 1)) * (source < P + R)
    logit_index = (prompt_lens[:, None] + torch.arange(R, device=ids.device)[None, :] - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).triu(1)[None, None]
    return MicroInputs(tokens=tokens, position_ids=cols[None, :].expand(len(part), -1), attention_mask=causal,
                       logit_index=logit_index, part=part)
