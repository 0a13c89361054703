"""Weights between Ray workers: what the backend proxy hands the rollout proxy, and what crosses the object store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from torch import Tensor

from rlcore import Weights


@attrs.define
class WeightsHandle:
    """What the backend proxy's `policy_weights` returns instead of `Weights`: the worker holding them.

    The driver never sees the tensors: the rollout proxy asks that worker to sync in process (colocated),
    or to export them once to the object store, from where every other rollout worker loads them."""

    source: Any
    """The `Worker` hosting the backend."""
    export: Callable[[], tuple[Any, float]] | None = None
    """Puts the backend's current weights in the object store: (reference, megabytes)."""
    ref: Any = None
    """Set by `snapshot`: the exported weights, which later optimizer steps do not change."""
    megabytes: float = 0.0

    def snapshot(self) -> WeightsHandle:
        """Export the weights now (asynchronous rollouts load this version after the trainer moved on)."""
        if self.export is None:
            raise ValueError("this weights handle cannot export its weights")
        ref, megabytes = self.export()
        return attrs.evolve(self, ref=ref, megabytes=megabytes)


@attrs.define
class WeightsPayload:
    """`Weights` made picklable: the tensors themselves (on the CPU) instead of a generator and a module."""

    tensors: dict[str, Tensor]
    version: int = 0
    adapter: bool = False
    adapter_config: dict[str, Any] | None = None

    @classmethod
    def pack(cls, weights: Weights) -> WeightsPayload:
        """Materialise the backend's weights on the CPU (the object store holds host memory)."""
        tensors = {name: t.detach().to("cpu", copy=False).contiguous() for name, t in weights.named_tensors()}
        return cls(tensors, weights.version, weights.adapter, weights.adapter_config)

    @property
    def megabytes(self) -> float:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) / 2**20

    def unpack(self) -> Weights:
        """The `Weights` a rollout's `sync_weights` expects (no live module: it lives in another process)."""
        return Weights(named_tensors=lambda: iter(self.tensors.items()), version=self.version,
                       adapter=self.adapter, adapter_config=self.adapter_config)
