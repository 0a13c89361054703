"""Placement on the host CPU: one device, gloo collectives, memory from the process's resident set."""

from __future__ import annotations

from pathlib import Path

import torch

from rlcore import hookimpl

GIB = 1024**3


def proc_status_gib(*keys: str) -> dict[str, float]:
    """Values of `keys` (kB lines such as VmRSS) from /proc/self/status, in GiB; empty where there is no /proc."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 / GIB for k in keys if k in fields}


class CPU:
    """The CPU as the run's only device (the default where no accelerator is installed)."""

    @hookimpl
    def hardware_available(self) -> bool:
        return True

    @hookimpl
    def device(self, local_rank: int) -> torch.device:
        """Every rank computes on the CPU."""
        return torch.device("cpu")

    @hookimpl
    def device_count(self) -> int:
        return 1

    @hookimpl
    def collective_backend(self) -> str:
        return "gloo"

    @hookimpl
    def visible_devices_env(self) -> str | None:
        return None

    @hookimpl
    def resource_name(self) -> str:
        return "CPU"

    @hookimpl
    def memory_stats(self) -> dict[str, float]:
        """Resident memory now (`used_gib`) and at its peak (`peak_gib`)."""
        stats = proc_status_gib("VmRSS", "VmHWM")
        names = {"VmRSS": "used_gib", "VmHWM": "peak_gib"}
        return {names[k]: v for k, v in stats.items()}

    @hookimpl
    def empty_cache(self) -> bool:
        """Nothing is cached on the CPU."""
        return True

    @hookimpl
    def manual_seed(self, seed: int) -> bool:
        torch.manual_seed(seed)
        return True
