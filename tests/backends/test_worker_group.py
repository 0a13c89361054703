"""Spawned worker groups report every failure by rank and never hang (with a stand-in worker)."""

from __future__ import annotations

import time

import pytest

from group_workers import DemoWorker
from rlcore.errors import ConfigError, TrainingError
from rlcore_backends.common.worker_group import SpawnedGroup


def specs(**extra: object) -> list[dict[str, object]]:
    return [{"rank": rank, **extra} for rank in range(2)]


def test_errors_are_raised_by_rank_and_a_dead_rank_stops_the_group() -> None:
    group = SpawnedGroup(DemoWorker, specs(), timeout_s=60, name="demo")
    try:
        assert group.call("whoami", [{"offset": 10}, {"offset": 20}]) == 10, "rank 0's answer"
        with pytest.raises(TrainingError, match=r"demo worker rank 1 failed in 'fail': ValueError: bad input"):
            group.call("fail", [{"rank": 1}] * 2)
        with pytest.raises(ConfigError, match=r"^backend.world_size=3 does not divide the batch$"):
            group.call("misconfigured", [{}] * 2)
        assert group.call("whoami", [{"offset": 0}] * 2) == 0, "a rank that raised keeps serving"
        start = time.monotonic()
        with pytest.raises(TrainingError, match=r"demo worker rank 1 \(pid \d+\) exited with code 3 during 'exit'"):
            group.call("exit", [{"rank": 1, "code": 3}] * 2)
        assert time.monotonic() - start < 10
        assert not any(p.is_alive() for p in group.processes)
        with pytest.raises(TrainingError, match=r"stopped earlier \(rank 1 exited with code 3\)"):
            group.call("whoami", [{"offset": 0}] * 2)
    finally:
        group.close()


def test_a_failed_setup_names_the_rank_and_stops_the_others() -> None:
    with pytest.raises(TrainingError, match=r"demo worker rank 1 failed in 'setup': RuntimeError: cannot load"):
        SpawnedGroup(DemoWorker, specs(fail_setup_on=1), timeout_s=60, name="demo")


def test_a_silent_rank_times_out() -> None:
    group = SpawnedGroup(DemoWorker, specs(), timeout_s=60, name="demo")
    group.timeout_s = 2
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"rank\(s\) \[0, 1\] gave no reply to 'sleep' within 2 s"):
        group.call("sleep", [{"seconds": 60}] * 2)
    assert time.monotonic() - start < 15
    assert not any(p.is_alive() for p in group.processes)
    group.close()
