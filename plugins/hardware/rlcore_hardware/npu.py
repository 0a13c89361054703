"""Placement on Huawei Ascend NPUs through torch_npu: device "npu", HCCL collectives, ASCEND_RT_VISIBLE_DEVICES.

torch_npu registers the `torch.npu` namespace when imported; it needs the Ascend CANN runtime
(libhccl.so and friends). Without it this plugin reports itself unavailable and every device call
gives an error that says what to install.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from rlcore import hookimpl
from rlcore.errors import RLCoreError

GIB = 1024**3
VISIBLE = "ASCEND_RT_VISIBLE_DEVICES"


def _torch_npu() -> ModuleType | None:
    """`torch.npu` after importing torch_npu, or None when torch_npu or the Ascend runtime is missing."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except (ImportError, OSError):
        return None
    return getattr(torch, "npu", None)


class NPU:
    """Ascend NPUs; `--hardware auto` picks it where torch_npu sees a device."""

    @hookimpl
    def hardware_available(self) -> bool:
        npu = _torch_npu()
        return bool(npu is not None and npu.is_available())

    @hookimpl
    def device(self, local_rank: int) -> torch.device:
        """NPU `local_rank` of those visible; a clear error without torch_npu, runtime or device."""
        npu = _torch_npu()
        if npu is None:
            raise RLCoreError("--hardware npu needs torch_npu and the Ascend CANN runtime: install CANN, then "
                              "pip install torch-npu matching your torch version; or use --hardware cpu")
        count = npu.device_count() if npu.is_available() else 0
        if not 0 <= local_rank < count:
            visible = f" ({VISIBLE}={os.environ[VISIBLE]!r})" if VISIBLE in os.environ else ""
            raise RLCoreError(f"local rank {local_rank} has no NPU: {count} Ascend device(s) visible{visible}")
        return torch.device("npu", local_rank)

    @hookimpl
    def device_count(self) -> int:
        npu = _torch_npu()
        return npu.device_count() if npu is not None and npu.is_available() else 0

    @hookimpl
    def collective_backend(self) -> str:
        return "hccl"

    @hookimpl
    def visible_devices_env(self) -> str | None:
        return VISIBLE

    @hookimpl
    def resource_name(self) -> str:
        return "NPU"

    @hookimpl
    def memory_stats(self) -> dict[str, float]:
        """Tensor memory on the current NPU now, at its peak, and reserved by the allocator; empty without one."""
        npu = _torch_npu()
        if npu is None or not npu.is_available():
            return {}
        return {"used_gib": npu.memory_allocated() / GIB, "peak_gib": npu.max_memory_allocated() / GIB,
                "reserved_gib": npu.memory_reserved() / GIB}

    @hookimpl
    def empty_cache(self) -> bool:
        npu = _torch_npu()
        if npu is not None and npu.is_available():
            npu.empty_cache()
        return True

    @hookimpl
    def manual_seed(self, seed: int) -> bool:
        npu = _torch_npu()
        if npu is not None:
            npu.manual_seed_all(seed)
        return True
