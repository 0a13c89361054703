"""Token-budget micro-batch planning and trimming, and data-parallel rank shards."""

from __future__ import annotations

import pytest
import torch

from rlcore.testing import make_batch
from rlcore_backends.common.micro_batches import by_length, plan, rank_shards, take


def test_plan_covers_the_batch_within_the_budget() -> None:
    batch = make_batch(groups=3, n=4, prompt_len=5, response_len=6, seed=2)
    for budget in (1, 8, 20, 50, 10**6):
        parts = plan(batch, budget)
        assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]] and parts[-1].stop == len(batch)
        for p in parts:
            assert p.stop > p.start
            assert p.padded_tokens <= budget or p.stop - p.start == 1, "over budget only for a single sample"
    assert len(plan(batch, 1)) == len(batch) and len(plan(batch, 10**6)) == 1


def test_take_trims_only_padding() -> None:
    batch = make_batch(groups=2, n=3, prompt_len=6, response_len=7, lengths=[2, 3, 1, 2, 3, 3], seed=1)
    (part,) = plan(batch.select([0, 1, 2]), 10**6)
    sub = take(batch, part)
    assert sub.response_ids.shape[1] == 3 and sub.prompt_ids.shape[1] == int(batch.prompt_mask[:3].sum(-1).max())
    assert torch.equal(sub.response_mask.sum(-1), batch.response_mask[:3].sum(-1))
    assert torch.equal(sub.prompt_mask.sum(-1), batch.prompt_mask[:3].sum(-1))
    assert sub.texts == batch.texts[:3]


@pytest.mark.parametrize("size, world", [(7, 2), (8, 4), (3, 3), (2, 4)])
def test_rank_shards_split_contiguously_and_pad_empty_ranks(size: int, world: int) -> None:
    batch = make_batch(groups=1, n=size, seed=3, with_advantages=True)
    shards = rank_shards(batch, world)
    rows = [real for _, real in shards]
    assert len(shards) == world and sum(rows) == size and max(rows) - min(rows) <= 1
    real = [shard for shard, n in shards if n]
    for name in ("response_ids", "response_mask", "advantages", "prompt_ids"):
        assert torch.equal(torch.cat([getattr(s, name) for s in real]), getattr(batch, name))
    for shard, n in shards:
        if n == 0:
            assert len(shard) == 1 and shard.response_mask.sum() == 0 and shard.advantages.abs().sum() == 0


def brute_force_least_cost(prompt: list[int], response: list[int], budget: int, pass_cost: int) -> float:
    """The least padded tokens + pass_cost per pass over every way to cut the sorted rows (2^(n-1) of them)."""
    n, best = len(prompt), float("inf")
    for cuts in range(2 ** (n - 1)):
        bounds = [0] + [i + 1 for i in range(n - 1) if cuts >> i & 1] + [n]
        cost = 0.0
        for i, j in zip(bounds, bounds[1:]):
            padded = (j - i) * (max(prompt[i:j]) + max(response[i:j]))
            if padded > budget and j - i > 1:
                cost = float("inf")
            cost += padded + pass_cost
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget, pass_cost", [(10**6, 8), (10**6, 0), (60, 8), (1, 8), (10**6, 10**6)])
def test_by_length_cuts_sorted_rows_where_padding_costs_more_than_a_pass(seed: int, budget: int, pass_cost: int) -> None:
    batch = make_batch(groups=3, n=3, prompt_len=9, response_len=8, seed=seed)
    order, parts = by_length(batch, budget, pass_cost)
    rows = batch.select(order)
    lengths = (rows.prompt_mask.sum(-1) + rows.response_lengths).tolist()
    assert sorted(order.tolist()) == list(range(len(batch))) and lengths == sorted(lengths)
    assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]] and parts[-1].stop == len(batch)
    for p in parts:
        sub = take(rows, p)
        assert torch.equal(sub.response_mask.sum(-1), rows.response_mask[p.start:p.stop].sum(-1)), "only padding cut"
        assert p.padded_tokens <= budget or p.stop - p.start == 1
    prompt, response = rows.prompt_mask.sum(-1).tolist(), rows.response_lengths.clamp(min=1).tolist()
    cost = sum(p.padded_tokens + pass_cost for p in parts)
    assert cost == brute_force_least_cost(prompt, response, budget, pass_cost)
    if pass_cost >= 10**6:
        assert len(parts) == 1, "a pass dearer than any padding: one micro-batch"
    if pass_cost == 0 and budget >= 10**6:
        assert sum(p.padded_tokens for p in parts) <= plan(batch, budget)[0].padded_tokens
