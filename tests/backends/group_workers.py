"""A stand-in worker for `SpawnedGroup` tests: cheap to start, and fails on demand."""

from __future__ import annotations

import os
import time
from typing import Any

from rlcore.errors import ConfigError


class DemoWorker:
    """Knows its rank; each method misbehaves only on the rank it is told to."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.rank = spec["rank"]
        if spec.get("fail_setup_on") == self.rank:
            raise RuntimeError(f"cannot load the model on rank {self.rank}")

    def whoami(self, offset: int) -> int:
        return self.rank + offset

    def fail(self, rank: int) -> int:
        if self.rank == rank:
            raise ValueError(f"bad input on rank {rank}")
        return self.rank

    def misconfigured(self) -> None:
        raise ConfigError("backend.world_size=3 does not divide the batch")

    def exit(self, rank: int, code: int) -> None:
        if self.rank == rank:
            os._exit(code)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        """Nothing to release."""
