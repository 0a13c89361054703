"""What every plugin receives in `setup`: the resolved run, and a typed facade over the hardware hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from rlcore.types import ModelSpec


class Hardware:
    """Typed access to the selected hardware plugin's answers (device, collectives, memory)."""

    def __init__(self, hook: Any, name: str) -> None:
        self._hook = hook
        self.name = name

    def device(self, local_rank: int = 0) -> torch.device:
        """The device a process of this local rank computes on."""
        return self._hook.device(local_rank=local_rank)

    def device_count(self) -> int:
        return int(self._hook.device_count())

    def collective_backend(self) -> str:
        """gloo, nccl or hccl."""
        return self._hook.collective_backend()

    def visible_devices_env(self) -> str | None:
        return self._hook.visible_devices_env()

    def resource_name(self) -> str:
        """What a distributed engine (Ray) schedules on: GPU, NPU or CPU."""
        return self._hook.resource_name()

    def memory_stats(self) -> dict[str, float]:
        return self._hook.memory_stats() or {}

    def empty_cache(self) -> None:
        self._hook.empty_cache()

    def manual_seed(self, seed: int) -> None:
        self._hook.manual_seed(seed=seed)


@attrs.define
class RunContext:
    """The resolved run, handed to every plugin's `setup`."""

    config: dict[str, Any]
    """The whole resolved config (plugin sections hold plain values; each plugin has its typed options)."""
    run_dir: Path
    model: ModelSpec
    hardware: Hardware
    seed: int
    resumed: bool = False
