"""Fixtures for the hf rollout and torch backend: the tiny model through rlcore's own plugin fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from rlcore import Prompt, RolloutBatch, SamplingParams
from rlcore.context import RunContext
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.update.torch.backend import TorchBackend

PROMPTS = ["1+2=", "12*34+5=", "7=", "100-99="]
"""Prompts of different lengths, so batches have real left padding."""


@pytest.fixture
def prompts() -> list[Prompt]:
    return [Prompt(messages=[{"role": "user", "content": c}], answer="", id=str(i)) for i, c in enumerate(PROMPTS)]


@pytest.fixture
def rollout(rlcore_context: RunContext) -> HFRollout:
    r = HFRollout(HFRollout.Options())
    r.setup(ctx=rlcore_context)
    return r


@pytest.fixture
def make_backend(rlcore_context: RunContext) -> Callable[..., TorchBackend]:
    """Build and set up a torch backend with the given options (fresh weights each time)."""
    def build(**options: object) -> TorchBackend:
        backend = TorchBackend(TorchBackend.Options(**options))
        backend.setup(ctx=rlcore_context)
        return backend
    return build


@pytest.fixture
def batch(rollout: HFRollout, prompts: list[Prompt]) -> RolloutBatch:
    """Sampled responses (some ended by EOS, some truncated) with fixed random advantages on the loss tokens."""
    b = rollout.sample(prompts=prompts, params=SamplingParams(n=3, max_new_tokens=10, seed=3), tools=[], interaction=None)
    b.advantages = torch.randn(b.response_ids.shape, generator=torch.Generator().manual_seed(0)) * b.response_mask
    return b
