"""Run as a child process by test_npu.py: the npu plugin against a stand-in for torch_npu's `torch.npu` API.

Registering the "npu" device type (what importing torch_npu does) cannot be undone within a process, so
this runs apart from the test session. Prints "ok" when every check holds.
"""

import sys
import types

import torch

from rlcore.errors import RLCoreError
from rlcore_hardware.npu import NPU


class NPUApi:
    """The parts of `torch.npu` the plugin calls, with two devices and 3 GiB in use."""

    def __init__(self) -> None:
        self.seeds: list[int] = []
        self.emptied = 0

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 2

    def memory_allocated(self) -> int:
        return 3 * 1024**3

    def max_memory_allocated(self) -> int:
        return 5 * 1024**3

    def memory_reserved(self) -> int:
        return 6 * 1024**3

    def empty_cache(self) -> None:
        self.emptied += 1

    def manual_seed_all(self, seed: int) -> None:
        self.seeds.append(seed)


api = NPUApi()
torch.utils.rename_privateuse1_backend("npu")
sys.modules["torch_npu"] = types.ModuleType("torch_npu")
torch.npu = api
plugin = NPU()
assert plugin.hardware_available() and plugin.device_count() == 2
assert plugin.device(local_rank=1) == torch.device("npu", 1)
try:
    plugin.device(local_rank=2)
    raise SystemExit("no error for a rank without an NPU")
except RLCoreError as e:
    assert "local rank 2 has no NPU: 2 Ascend device" in str(e), e
assert plugin.memory_stats() == {"used_gib": 3.0, "peak_gib": 5.0, "reserved_gib": 6.0}, plugin.memory_stats()
assert plugin.empty_cache() and api.emptied == 1
assert plugin.manual_seed(seed=7) and api.seeds == [7]
print("ok")
