"""Holding more open files than select() can wait on (1024), as a busy trainer may."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def past_select_limit(count: int = 1100) -> Iterator[None]:
    """`count` open files (the last numbered past 1024) while the block runs; skips the test where the
    hard RLIMIT_NOFILE does not allow them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < count + 100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {count + 100}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 100), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(count)]
    try:
        assert held[-1] > 1024
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
