"""The npu plugin: without torch_npu (this machine) it is unavailable with a clear error; with a
torch.npu namespace present it maps ranks, memory and seeding onto that API."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from rlcore.errors import RLCoreError
from rlcore.plugins import load, select_hardware
from rlcore.testing import check_hardware
from rlcore_hardware.npu import NPU


def test_entry_point_and_contract():
    assert load("hardware", "npu") is NPU
    check_hardware(NPU())


@pytest.mark.skipif("torch_npu" in sys.modules, reason="checks the behaviour without torch_npu")
def test_without_torch_npu():
    plugin = NPU()
    assert plugin.hardware_available() is False and plugin.device_count() == 0
    assert plugin.memory_stats() == {} and plugin.empty_cache() is True and plugin.manual_seed(seed=1) is True
    with pytest.raises(RLCoreError, match="torch_npu and the Ascend CANN runtime"):
        plugin.device(local_rank=0)
    assert (plugin.collective_backend(), plugin.visible_devices_env(), plugin.resource_name()) == \
        ("hccl", "ASCEND_RT_VISIBLE_DEVICES", "NPU")
    assert select_hardware("auto") == "cpu"


class _NPUApi:
    """The parts of torch_npu's `torch.npu` API the plugin calls, with two devices and 3 GiB in use."""

    def __init__(self):
        self.seeds, self.emptied = [], 0

    def is_available(self):
        return True

    def device_count(self):
        return 2

    def memory_allocated(self):
        return 3 * 1024**3

    def max_memory_allocated(self):
        return 5 * 1024**3

    def memory_reserved(self):
        return 6 * 1024**3

    def empty_cache(self):
        self.emptied += 1

    def manual_seed_all(self, seed):
        self.seeds.append(seed)


def test_with_the_torch_npu_api(monkeypatch):
    api = _NPUApi()
    if torch._C._get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")  # what importing torch_npu does first
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", api, raising=False)
    plugin = NPU()
    assert plugin.hardware_available() and plugin.device_count() == 2
    assert plugin.device(local_rank=1) == torch.device("npu", 1)
    with pytest.raises(RLCoreError, match="local rank 2 has no NPU: 2 Ascend device"):
        plugin.device(local_rank=2)
    assert plugin.memory_stats() == {"used_gib": 3.0, "peak_gib": 5.0, "reserved_gib": 6.0}
    assert plugin.empty_cache() and api.emptied == 1
    assert plugin.manual_seed(seed=7) and api.seeds == [7]
