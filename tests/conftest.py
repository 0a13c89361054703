"""Shared test setup: quiet thread behaviour on shared 2-core machines, offline Hugging Face, a private cache."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "RLCORE_CACHE_DIR" not in os.environ:  # `dtype: auto` measures once per session, not into the user's cache
    os.environ["RLCORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlcore-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RLCORE_CACHE_DIR"], True)
