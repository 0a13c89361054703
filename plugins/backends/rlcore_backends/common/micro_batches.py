"""Cutting a batch for training: token-budget micro-batches (consecutive samples packed so each forward
pass stays within a budget) and contiguous shards for data-parallel ranks."""

from __future__ import annotations

import attrs
import torch

from rlcore.types import RolloutBatch

PROMPT_FIELDS = ("prompt_ids", "prompt_mask")
RESPONSE_FIELDS = ("response_ids", "response_mask", "attention_mask", "rollout_logprobs", "advantages",
                   "old_logprobs", "ref_logprobs")


@attrs.frozen
class MicroBatch:
    """Rows [start, stop) of a batch, trimmed to the longest prompt and response among them."""

    start: int
    stop: int
    prompt_width: int
    response_width: int

    @property
    def padded_tokens(self) -> int:
        """Tokens of the forward pass, padding included."""
        return (self.stop - self.start) * (self.prompt_width + self.response_width)


def plan(batch: RolloutBatch, token_budget: int) -> list[MicroBatch]:
    """Pack consecutive samples so each micro-batch's padded tokens are <= `token_budget` (>= 1 sample each)."""
    prompt_lens = batch.prompt_mask.sum(-1).tolist()
    response_lens = batch.response_lengths.clamp(min=1).tolist()
    out: list[MicroBatch] = []
    start, p, r = 0, 0, 0
    for i, (pl, rl) in enumerate(zip(prompt_lens, response_lens)):
        wider_p, wider_r = max(p, pl), max(r, rl)
        if i > start and (i + 1 - start) * (wider_p + wider_r) > token_budget:
            out.append(MicroBatch(start, i, p, r))
            start, wider_p, wider_r = i, pl, rl
        p, r = wider_p, wider_r
    if len(batch) > start:
        out.append(MicroBatch(start, len(batch), p, r))
    return out


def take(batch: RolloutBatch, mb: MicroBatch) -> RolloutBatch:
    """The micro-batch's rows with prompt columns cut to the last `prompt_width` and responses to the first
    `response_width`, so the forward pass skips columns that are padding in every row."""
    part = batch.select(torch.arange(mb.start, mb.stop))
    changes = {name: getattr(part, name)[:, -mb.prompt_width:] for name in PROMPT_FIELDS}
    changes.update({name: getattr(part, name)[:, :mb.response_width] for name in RESPONSE_FIELDS
                    if getattr(part, name) is not None})
    return attrs.evolve(part, **changes)


def rank_shards(batch: RolloutBatch, world_size: int) -> list[tuple[RolloutBatch, int]]:
    """`world_size` contiguous shards (sizes differ by at most one), each with its number of real rows.

    A rank left without a sample gets the batch's first row with its loss mask zeroed (0 real rows): it
    still joins every collective pass but adds nothing to the loss, the counts or the gradients.
    """
    out = []
    for rows in torch.arange(len(batch)).tensor_split(world_size):
        if len(rows):
            out.append((batch.select(rows), len(rows)))
            continue
        empty = batch.select([0])
        empty.response_mask = torch.zeros_like(empty.response_mask)
        if empty.advantages is not None:
            empty.advantages = torch.zeros_like(empty.advantages)
        out.append((empty, 0))
    return out
