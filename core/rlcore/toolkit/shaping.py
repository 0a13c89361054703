"""DAPO's reward shaping and group filter (Yu et al. 2025, arXiv 2503.14476)."""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """Soft overlong punishment [B]: 0 up to max_length - buffer, then falling linearly to -factor at
    max_length (and staying there beyond it). A buffer of 0 switches it off."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    exceed = lengths.float() - (max_length - buffer)
    return (-exceed / buffer).clamp(-1.0, 0.0) * factor


def keep_varied_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dynamic sampling: one bool per group id 0..max(group_ids); False for groups of two or more
    samples whose rewards are all equal (no learning signal). Ids absent from the batch stay True."""
    size = int(group_ids.max()) + 1 if group_ids.numel() else 0
    high = torch.full((size,), -torch.inf, device=rewards.device).scatter_reduce(0, group_ids, rewards.float(), "amax")
    low = torch.full((size,), torch.inf, device=rewards.device).scatter_reduce(0, group_ids, rewards.float(), "amin")
    count = torch.bincount(group_ids, minlength=size)
    return (count < 2) | (high > low)
