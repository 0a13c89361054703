"""The npu plugin: without torch_npu (this machine) it is unavailable with a clear error; with a
torch.npu namespace present it maps ranks, memory and seeding onto that API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_with_the_torch_npu_api():
    """Device mapping, memory and seeding against torch.npu's API, in a child process (see fake_torch_npu.py)."""
    script = Path(__file__).with_name("fake_torch_npu.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
