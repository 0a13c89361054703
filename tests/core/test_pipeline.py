"""The asynchronous rollout pipeline alone, with fake collect and sync functions: exact policy versions,
the staleness bound, overlap, pausing, resuming from queued batches, and errors."""

from __future__ import annotations

import threading
import time

import pytest

from rlcore.errors import DataError, TrainingError
from rlcore.pipeline import Collected, RolloutPipeline
from rlcore.types import Weights


def weights(version: int) -> Weights:
    return Weights(named_tensors=lambda: iter(()), version=version)


class Fakes:
    """Records what the producer did, in order."""

    def __init__(self, fail_at: int | None = None, collect_seconds: float = 0.0) -> None:
        self.events: list[tuple[str, int]] = []
        self.fail_at = fail_at
        self.collect_seconds = collect_seconds
        self.in_collect = threading.Event()

    def collect(self, step: int) -> Collected:
        self.in_collect.set()
        if step == self.fail_at:
            raise RuntimeError("engine died")
        time.sleep(self.collect_seconds)
        self.events.append(("collect", step))
        self.in_collect.clear()
        return Collected(step=step, batch=None, metrics={"step": step}, version=-1)

    def sync(self, w: Weights) -> dict[str, float]:
        self.events.append(("sync", w.version))
        return {}


def eventually(condition, timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds (a busy machine may be slow), False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def pipeline(fakes: Fakes, k: int, steps: int = 6, next_step: int = 0, version: int = 0,
             queued: list[Collected] | None = None) -> RolloutPipeline:
    p = RolloutPipeline(fakes.collect, fakes.sync, k, next_step, steps, version, weights(version), queued)
    p.start()
    return p


def train(p: RolloutPipeline, steps: range) -> list[tuple[int, int]]:
    """The loop's side: take each step's batch, 'train', publish the next version."""
    seen = []
    for step in steps:
        collected, _ = p.take(step)
        seen.append((collected.step, collected.version))
        p.publish(step + 1, weights(step + 1))
    return seen


@pytest.mark.parametrize("k", [1, 2, 3])
def test_step_j_is_sampled_with_version_j_minus_k_exactly(k):
    fakes = Fakes()
    p = pipeline(fakes, k)
    try:
        assert train(p, range(6)) == [(j, max(0, j - k)) for j in range(6)]
    finally:
        p.close()
    syncs = [v for kind, v in fakes.events if kind == "sync"]
    assert syncs == list(range(1, 6 - k))  # each needed version loaded once, in order, none skipped


def test_sampling_never_runs_ahead_of_the_bound():
    fakes = Fakes()
    p = pipeline(fakes, k=1)
    try:
        p.take(0)  # version 1 not published: step 1 (needs version 0) is sampled, step 2 is not
        assert eventually(lambda: ("collect", 1) in fakes.events)
        time.sleep(0.2)
        assert ("collect", 2) not in fakes.events
        p.publish(1, weights(1))
        p.take(1)
        assert eventually(lambda: ("collect", 2) in fakes.events)
        time.sleep(0.2)
        assert ("collect", 3) not in fakes.events
    finally:
        p.close()


def test_the_rollout_samples_while_the_trainer_trains():
    fakes = Fakes()
    p = pipeline(fakes, k=1)
    try:
        p.take(0)  # the loop now trains step 0; version 1 does not exist yet
        assert eventually(lambda: ("collect", 1) in fakes.events)  # step 1 was sampled meanwhile
        p.publish(1, weights(1))
        collected, _ = p.take(1)
        assert (collected.step, collected.version) == (1, 0)
    finally:
        p.close()


def test_never_samples_past_the_last_step():
    fakes = Fakes()
    p = pipeline(fakes, k=2, steps=3)
    try:
        train(p, range(3))
        time.sleep(0.1)
    finally:
        p.close()
    assert [s for kind, s in fakes.events if kind == "collect"] == [0, 1, 2]


def test_paused_holds_the_producer_and_drain_fills_the_queue_to_the_bound():
    fakes = Fakes(collect_seconds=0.05)
    p = pipeline(fakes, k=2, steps=10)
    try:
        train(p, range(3))  # versions 1..3 published; steps up to 3 + 2 can be sampled
        with p.paused(drain_until=5):
            assert [c.step for c in p.queued()] == [3, 4, 5]
            assert not fakes.in_collect.is_set()
            count = len(fakes.events)
            p.publish(4, weights(4))  # would allow step 6, but the producer is held
            time.sleep(0.15)
            assert len(fakes.events) == count  # nothing runs while paused
        assert train(p, range(3, 10)) == [(j, max(0, j - 2)) for j in range(3, 10)]
    finally:
        p.close()


def test_resuming_from_queued_batches_continues_the_same_schedule():
    fakes = Fakes()
    queued = [Collected(step=s, batch=None, metrics={}, version=max(0, s - 2)) for s in (3, 4, 5)]
    p = pipeline(fakes, k=2, steps=8, next_step=6, version=3, queued=queued)
    try:
        assert train(p, range(3, 8)) == [(j, max(0, j - 2)) for j in range(3, 8)]
    finally:
        p.close()
    assert [e for e in fakes.events if e[0] == "sync"] == [("sync", 4), ("sync", 5)]


def test_an_error_in_the_rollout_thread_reaches_the_loop():
    fakes = Fakes(fail_at=1)
    p = pipeline(fakes, k=1)
    try:
        p.take(0)
        with pytest.raises(TrainingError, match="rollout thread failed: RuntimeError: engine died"):
            p.take(1)
    finally:
        p.close()


def test_zero_staleness_is_not_a_pipeline():
    with pytest.raises(ValueError, match="synchronous"):
        RolloutPipeline(Fakes().collect, Fakes().sync, 0, 0, 1, 0, weights(0))


def test_a_users_mistake_in_the_rollout_thread_reaches_the_loop_as_it_is():
    def collect(step: int) -> Collected:
        raise DataError("task 'x' returned 4 non-finite rewards")

    p = RolloutPipeline(collect, Fakes().sync, 1, 0, 3, 0, weights(0))
    p.start()
    try:
        with pytest.raises(DataError, match="^task 'x' returned 4 non-finite rewards$"):
            p.take(0)
    finally:
        p.close()


def test_no_version_older_than_the_first_is_waited_for():
    """A run extended past its end (resumed at version 3, nothing queued) samples steps 3 and 4 with version 3."""
    fakes = Fakes()
    p = pipeline(fakes, k=2, steps=7, next_step=3, version=3)
    try:
        assert train(p, range(3, 7)) == [(3, 3), (4, 3), (5, 3), (6, 4)]
    finally:
        p.close()
