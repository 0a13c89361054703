"""Advantage estimators on outcome rewards: group-relative (GRPO, Dr.GRPO), leave-one-out (RLOO),
discounted returns with batch whitening (REINFORCE++). All handle groups of one and all-equal rewards
with an exact 0 rather than a NaN or float noise."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor


@attrs.frozen
class GroupStats:
    """Per-sample statistics of the sample's group, each [B]."""

    mean: Tensor
    std: Tensor
    """Unbiased (Bessel-corrected) standard deviation, 0 for a group of one."""
    count: Tensor
    constant: Tensor
    """True where every reward of the group is equal (zero variance)."""


def group_stats(values: Tensor, group_ids: Tensor) -> GroupStats:
    """Mean, unbiased std, size and constancy of each sample's group; group ids may be any integers."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    groups = int(inv.max()) + 1 if inv.numel() else 0
    v = values.double()
    count = torch.bincount(inv, minlength=groups).double()
    mean = torch.zeros(groups, dtype=v.dtype, device=v.device).index_add_(0, inv, v) / count
    dev = v - mean[inv]
    squares = torch.zeros(groups, dtype=v.dtype, device=v.device).index_add_(0, inv, dev.square())
    var = squares / (count - 1).clamp(min=1)
    high = torch.full((groups,), -torch.inf, dtype=v.dtype, device=v.device).scatter_reduce(0, inv, v, "amax")
    low = torch.full((groups,), torch.inf, dtype=v.dtype, device=v.device).scatter_reduce(0, inv, v, "amin")
    return GroupStats(mean=mean[inv].to(values.dtype), std=var.sqrt()[inv].to(values.dtype),
                      count=count[inv].long(), constant=(high == low)[inv])


def grpo_advantages(rewards: Tensor, group_ids: Tensor, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """(r - group mean) / (group std + eps), or r - group mean without std normalisation (Dr.GRPO); [B].

    A group of one sample or of equal rewards carries no relative signal: its advantage is 0.
    """
    s = group_stats(rewards, group_ids)
    adv = rewards - s.mean
    if norm_by_std:
        adv = adv / (s.std + eps)
    return adv.where((s.count > 1) & ~s.constant, torch.zeros_like(adv))


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """r_i minus the mean of the other samples of its group, = n/(n-1) (r_i - group mean); [B]."""
    s = group_stats(rewards, group_ids)
    adv = (rewards - s.mean) * s.count / (s.count - 1).clamp(min=1)
    return adv.where((s.count > 1) & ~s.constant, torch.zeros_like(adv))


def last_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """A [B, R] tensor holding each sequence reward at its last loss token (nowhere if it has none)."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask > 0, cols, -1).amax(-1)
    return torch.where(cols[None, :] == last[:, None], rewards[:, None], torch.zeros((), dtype=rewards.dtype))


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Return-to-go over loss tokens, G_t = r_t + gamma * G_next; tokens outside the mask (tool output,
    padding) pass the return through without discount, so an outcome reward reaches earlier turns."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, token_rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the loss tokens of the whole batch (unbiased var); 0 outside the
    mask, and 0 everywhere when all loss tokens hold the same value."""
    on = mask > 0
    picked = values[on].double()
    if picked.numel() < 2 or bool(picked.max() == picked.min()):
        return torch.zeros_like(values)
    white = (values.double() - picked.mean()) * torch.rsqrt(picked.var() + eps)
    return white.where(on, 0.0).to(values.dtype)


def broadcast(seq_advantages: Tensor, mask: Tensor) -> Tensor:
    """A per-sequence advantage [B] copied onto every loss token, 0 elsewhere; [B, R]."""
    return seq_advantages[:, None].to(mask.dtype) * (mask > 0)
