"""Shared test setup: quiet thread behaviour on shared 2-core machines, offline Hugging Face, a private cache, and
glibc's own malloc settings kept for the suite's process."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "RLCORE_CACHE_DIR" not in os.environ:  # `dtype: auto` measures once per session, not into the user's cache
    os.environ["RLCORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlcore-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RLCORE_CACHE_DIR"], True)


@pytest.fixture(autouse=True)
def _glibc_malloc_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's setup makes glibc keep freed memory for the rest of its process (`trainer.keep_freed_memory`);
    the suite sets many runs up in one process, whose other tests expect glibc's defaults (a fresh 64 MiB
    tensor raises the resident set), so here it is not applied: tests/core/test_host_memory.py checks it in a
    child process."""
    from rlcore import host_memory

    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)
