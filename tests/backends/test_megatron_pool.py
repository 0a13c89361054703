"""The Megatron backend's worker pool with a trivial worker: answers in rank order; an error or silence
becomes a TrainingError naming the rank, after which the pool is stopped. (A dead worker and an rlcore error
raised in a worker are tested on the real backend, in test_megatron_backend.py.)"""

from __future__ import annotations

import time

import pytest

from rlcore.errors import TrainingError
from rlcore_backends.update.megatron.pool import WorkerPool

pytestmark = pytest.mark.slow  # each pool spawns two Python processes that import torch


class Echo:
    """A stand-in for `megatron_worker.Worker`."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def close(self) -> None:
        pass


def whoami(worker: Echo, offset: int) -> int:
    return worker.rank + offset


def fail_on_rank_1(worker: Echo) -> None:
    if worker.rank == 1:
        raise ValueError("boom")


def hang_on_rank_0(worker: Echo) -> None:
    if worker.rank == 0:
        time.sleep(60)


def test_answers_in_rank_order_then_an_error_names_the_rank() -> None:
    pool = WorkerPool(Echo, 2, timeout=60)
    try:
        assert pool.run(whoami, 10) == [10, 11]
        with pytest.raises(TrainingError, match=r"(?s)rank 1 failed during fail_on_rank_1:.*ValueError: boom"):
            pool.run(fail_on_rank_1)
        assert not any(p.is_alive() for p in pool.processes), "a failure stops every worker"
        with pytest.raises(TrainingError, match="stopped after an earlier failure"):
            pool.run(whoami, 0)
    finally:
        pool.close()


def test_a_silent_worker_times_out() -> None:
    pool = WorkerPool(Echo, 2, timeout=60)
    pool.timeout = 2  # after start-up
    try:
        with pytest.raises(TrainingError, match=r"ranks \[0\] did not answer hang_on_rank_0 within 2 s"):
            pool.run(hang_on_rank_0)
    finally:
        pool.close()
