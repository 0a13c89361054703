"""Asynchronous rollouts with bounded staleness: batches for later steps are sampled in a background thread
while the loop trains on earlier ones (`trainer.max_staleness` k >= 1).

The batch for step j is always sampled with the weights of policy version max(0, j - k) exactly (version v
= the weights after v training steps; a run extended past its end starts from its last version), so the run is deterministic for a given k however the two sides'
speeds vary, and no sample is trained on more than k versions after the weights that produced it. Sampling
for step j waits until version j - k exists; training step j waits until its batch exists; within the
bound neither waits for the other. Versions are materialised when published (`Weights.snapshot`), because
the trainer moves on while an older version is still being loaded into the rollout engine.

Only the producer thread calls the rollout's `sample` and `sync_weights` (and the task's `score`); the loop
pauses it at a batch boundary to evaluate or checkpoint (`paused`).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from rlcore.errors import RLCoreError, TrainingError
from rlcore.types import RolloutBatch, Weights

Collect = Callable[[int], "Collected"]
Sync = Callable[[Weights], "dict[str, float] | None"]


def batch_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of one sampling round of one step (31 bits, well spread: engines seed row i with
    `seed + i`, so seeds of different steps must not sit next to each other)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{round_}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") >> 1


@attrs.define
class Collected:
    """One step's sampled and scored batch (None when every group was filtered out) and its metrics."""

    step: int
    batch: RolloutBatch | None
    metrics: dict[str, Any]
    version: int
    """The policy version whose weights sampled it."""


class RolloutPipeline:
    """The producer thread and the hand-over of batches (to the loop) and weights (from the loop)."""

    def __init__(self, collect: Collect, sync: Sync, max_staleness: int, next_step: int, end_step: int,
                 version: int, weights: Weights, queued: list[Collected] | None = None) -> None:
        """`next_step`: the first step the producer samples for; `version`/`weights`: what the rollout engine
        holds now; `queued`: batches sampled before a resume, handed out first."""
        if max_staleness < 1:
            raise ValueError("RolloutPipeline needs max_staleness >= 1; 0 is the synchronous loop")
        self.collect, self.sync, self.k = collect, sync, max_staleness
        self.next_step, self.end_step = next_step, end_step
        self.version, self.weights = version, weights
        self.oldest = version
        """No older version exists: a run extended past its last step (`--resume --steps`) samples its first
        k new batches with it, less stale than the schedule says."""
        self.published: dict[int, Weights] = {version: weights}
        self.queue: dict[int, Collected] = {c.step: c for c in queued or []}
        self.cond = threading.Condition()
        self.pause_requests = 0
        self.idle = True
        """True while the producer is outside `collect`/`sync` (so the loop may use the rollout)."""
        self.error: BaseException | None = None
        self.stopping = False
        self.rollout_wait = 0.0
        self.thread = threading.Thread(target=self._run, name="rlcore-rollout", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # ---- the loop's side ----------------------------------------------------------------------------

    def take(self, step: int) -> tuple[Collected, float]:
        """The batch for `step`, and the seconds the loop waited for it."""
        start = time.perf_counter()
        with self.cond:
            self.cond.wait_for(lambda: step in self.queue or self.error is not None)
            if step not in self.queue:
                self._raise()
            collected = self.queue.pop(step)
            self.cond.notify_all()
        return collected, time.perf_counter() - start

    def publish(self, version: int, weights: Weights) -> None:
        """The trainer's weights after `version` optimizer steps (already materialised)."""
        with self.cond:
            self.published[version] = weights
            self.cond.notify_all()

    def rollout_wait_seconds(self) -> float:
        """Seconds the producer waited for weights since the last call."""
        with self.cond:
            waited, self.rollout_wait = self.rollout_wait, 0.0
        return waited

    @contextlib.contextmanager
    def paused(self, drain_until: int | None = None) -> Iterator[None]:
        """Hold the producer at a batch boundary for the duration (the rollout is the loop's meanwhile).
        With `drain_until`, first let it sample every step up to that one that the published weights allow."""
        with self.cond:
            if drain_until is not None:
                self.cond.wait_for(lambda: self.error is not None or self.next_step > min(drain_until, self.end_step - 1)
                                   or (self.idle and self._needed(self.next_step) not in self.published))
            self.pause_requests += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.idle or self.error is not None)
            self._raise()
        try:
            yield
        finally:
            with self.cond:
                self.pause_requests -= 1
                self.cond.notify_all()

    def queued(self) -> list[Collected]:
        """The batches sampled but not yet trained on, in step order (for a checkpoint; call while paused)."""
        with self.cond:
            return [self.queue[s] for s in sorted(self.queue)]

    def close(self) -> None:
        """Stop the producer after its current batch (it is a daemon thread: a batch in flight is abandoned)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=5.0)

    # ---- the producer's side ------------------------------------------------------------------------

    def _needed(self, step: int) -> int:
        return max(self.oldest, step - self.k)

    def _raise(self) -> None:
        """Hand the producer's error to the loop: a user's mistake as it is (one line), else as a TrainingError."""
        if isinstance(self.error, RLCoreError):
            raise self.error
        if self.error is not None:
            raise TrainingError(f"the rollout thread failed: {type(self.error).__name__}: {self.error}") from self.error

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    start = time.perf_counter()
                    self.cond.wait_for(lambda: self.stopping or (self.pause_requests == 0 and (
                        self.next_step >= self.end_step or self._needed(self.next_step) in self.published)))
                    if self.stopping or self.next_step >= self.end_step:
                        return
                    self.rollout_wait += time.perf_counter() - start
                    step, version = self.next_step, self._needed(self.next_step)
                    weights = self.published[version]
                    for old in [v for v in self.published if v < version]:
                        del self.published[old]
                    self.idle = False
                try:
                    synced = None
                    if version != self.version:
                        synced = self.sync(weights)
                        self.version, self.weights = version, weights
                    collected = self.collect(step)
                    collected.version = version
                    collected.metrics.update(synced or {})
                finally:
                    with self.cond:
                        self.idle = True
                        self.cond.notify_all()
                with self.cond:
                    self.queue[step] = collected
                    self.next_step = step + 1
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it as a TrainingError
            with self.cond:
                self.error = e
                self.idle = True
                self.cond.notify_all()
