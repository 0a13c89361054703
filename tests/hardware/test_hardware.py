"""The cpu and cuda hardware plugins: placement answers, memory stats, seeding, and the error without a GPU."""

from __future__ import annotations

import mmap

import pytest
import torch

from rlcore.context import Hardware
from rlcore.errors import RLCoreError
from rlcore.plugins import Registry, instantiate, load, select_hardware
from rlcore.testing import check_hardware
from rlcore_hardware.cpu import CPU
from rlcore_hardware.cuda import CUDA

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


def facade(name: str) -> Hardware:
    """The plugin registered as a run registers it, behind the core's typed facade."""
    registry = Registry()
    registry.register("hardware", name, instantiate(load("hardware", name), None, "hardware"))
    return Hardware(registry.hook, name)


def test_entry_points_name_the_classes():
    assert load("hardware", "cpu") is CPU and load("hardware", "cuda") is CUDA


@pytest.mark.parametrize("plugin", [CPU(), CUDA()], ids=["cpu", "cuda"])
def test_contract(plugin):
    check_hardware(plugin)


# ---- cpu ---------------------------------------------------------------------------------------------

def test_cpu_placement_answers():
    hw = facade("cpu")
    assert hw.device(0) == hw.device(3) == torch.device("cpu")
    assert hw.device_count() == 1
    assert hw.collective_backend() == "gloo"
    assert hw.visible_devices_env() is None
    assert hw.resource_name() == "CPU"
    assert CPU().hardware_available() is True and CPU().empty_cache() is True


def test_cpu_memory_stats_follow_the_resident_set():
    hw = facade("cpu")
    before = hw.memory_stats()
    assert set(before) == {"used_gib", "peak_gib"}
    assert 0 < before["used_gib"] <= before["peak_gib"] < 1024
    block = mmap.mmap(-1, 64 * 1024**2)  # 64 MiB of fresh pages, whatever the allocator keeps
    block.write(b"\1" * len(block))
    after = hw.memory_stats()
    assert after["used_gib"] - before["used_gib"] > 48 / 1024
    assert after["peak_gib"] >= after["used_gib"]
    block.close()


def test_cpu_manual_seed_makes_sampling_repeat():
    hw = facade("cpu")
    hw.manual_seed(123)
    a = torch.randn(5)
    hw.manual_seed(123)
    assert torch.equal(a, torch.randn(5))
    assert CPU().manual_seed(seed=1) is True


@no_gpu
def test_auto_falls_back_to_cpu_without_a_gpu():
    assert select_hardware("auto") == "cpu"


# ---- cuda without a GPU ------------------------------------------------------------------------------

def test_cuda_constants():
    cuda = CUDA()
    assert cuda.collective_backend() == "nccl"
    assert cuda.visible_devices_env() == "CUDA_VISIBLE_DEVICES"
    assert cuda.resource_name() == "GPU"


@no_gpu
def test_cuda_reports_unavailable_and_answers_safely():
    cuda = CUDA()
    assert cuda.hardware_available() is False
    assert cuda.device_count() == 0
    assert cuda.memory_stats() == {}
    assert cuda.empty_cache() is True and cuda.manual_seed(seed=0) is True


@no_gpu
def test_cuda_device_without_a_gpu_says_to_use_cpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(RLCoreError, match=r"no CUDA device visible.*use --hardware cpu"):
        facade("cuda").device(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RLCoreError, match=r"CUDA_VISIBLE_DEVICES=''"):
        CUDA().device(local_rank=0)


# ---- cuda on a GPU -----------------------------------------------------------------------------------

@needs_gpu
def test_cuda_places_ranks_on_visible_gpus():
    hw = facade("cuda")
    assert CUDA().hardware_available() is True
    assert hw.device(0) == torch.device("cuda", 0)
    assert hw.device_count() == torch.cuda.device_count() >= 1
    with pytest.raises(RLCoreError, match="local rank"):
        hw.device(hw.device_count())


@needs_gpu
def test_cuda_memory_stats_see_an_allocation_and_empty_cache_releases_it():
    hw = facade("cuda")
    torch.cuda.empty_cache()
    before = hw.memory_stats()
    assert set(before) == {"used_gib", "peak_gib", "reserved_gib"}
    block = torch.ones(256 * 1024**2 // 4, device="cuda")  # 256 MiB
    during = hw.memory_stats()
    assert during["used_gib"] - before["used_gib"] >= 0.24
    assert during["peak_gib"] >= during["used_gib"] and during["reserved_gib"] >= during["used_gib"]
    del block
    hw.empty_cache()
    assert hw.memory_stats()["reserved_gib"] < during["reserved_gib"]


@needs_gpu
def test_cuda_manual_seed_makes_gpu_sampling_repeat():
    hw = facade("cuda")
    hw.manual_seed(7)
    a = torch.randn(5, device="cuda")
    hw.manual_seed(7)
    assert torch.equal(a, torch.randn(5, device="cuda"))
