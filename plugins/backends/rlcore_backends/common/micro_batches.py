"""Cutting a batch for training: token-budget micro-batches (consecutive samples packed so each forward
pass stays within a budget, or rows sorted by length and cut where padding would cost more than a pass)
and contiguous shards for data-parallel ranks."""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor

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


def pass_cost_tokens(device: torch.device) -> int:
    """What one more forward(-backward) pass costs, in padded tokens: `by_length` cuts a micro-batch in two
    only where that saves more padding than this. On a CPU a pass's fixed cost (per-layer calls, smaller
    matmuls) is ~10 tokens' worth for a 135M model, so 128 is safe; a GPU launches ~1000 kernels per pass,
    ~1-2k tokens' worth of a 0.5B model at full speed (an estimate, not measured here)."""
    return 128 if device.type == "cpu" else 2048


def by_length(batch: RolloutBatch, token_budget: int, pass_cost: int) -> tuple[Tensor, list[MicroBatch]]:
    """The rows sorted by length (`batch.select(order)`) and micro-batches of consecutive sorted rows that
    carry the least padding: within `token_budget` (>= 1 sample each), cut wherever a cut saves more than
    `pass_cost` padded tokens (an exact dynamic programme over the sorted rows). The update sums its
    micro-batches whatever their order; a logprob pass puts its rows back with `order`."""
    prompt_lens = batch.prompt_mask.sum(-1).long()
    response_lens = batch.response_lengths.clamp(min=1).long()
    order = torch.argsort(prompt_lens + response_lens, stable=True)
    p, r = prompt_lens[order], response_lens[order]
    n = len(order)
    best = torch.zeros(n + 1, dtype=torch.float64)  # best[j]: least cost of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        # micro-batch [i, j) for every i < j: its widths are the maxima of rows i..j-1
        widths = p[:j].flip(0).cummax(0).values.flip(0) + r[:j].flip(0).cummax(0).values.flip(0)
        rows = j - torch.arange(j)
        padded = (rows * widths).double()
        cost = (best[:j] + padded + pass_cost).masked_fill((padded > token_budget) & (rows > 1), math.inf)
        cut[j] = int(cost.argmin())  # the first minimum: the fewest passes among equal costs
        best[j] = cost[cut[j]]
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return order, [MicroBatch(i, j, int(p[i:j].max()), int(r[i:j].max())) for i, j in reversed(bounds)]


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
