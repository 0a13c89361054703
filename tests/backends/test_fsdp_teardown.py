"""The fsdp backend leaves nothing running at exit: under torchrun both ranks free the process group when
the group closes, so gloo's threads are joined before the interpreter tears down, and the job exits 0.

Before this was so, a gloo worker thread could still be releasing the last collective's tensors when the
interpreter finalized; taking the GIL then killed it inside a noexcept destructor and the rank aborted
("terminate called without an active exception", SIGABRT) after a run that had succeeded: about one job in
five of `fsdp_teardown_rank.py`, every time with gloo's threads alive after close. ~10 s per job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RANK_SCRIPT = Path(__file__).with_name("fsdp_teardown_rank.py")
JOBS = 3


@pytest.mark.slow
def test_torchrun_ranks_free_the_process_group_and_exit_cleanly(rlcore_tiny_model: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(RANK_SCRIPT), str(rlcore_tiny_model)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for job in range(JOBS):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        output = f"job {job}:\n{proc.stdout}\n{proc.stderr}"
        assert proc.returncode == 0, output
        assert "terminate called" not in proc.stderr, output
        for rank in (0, 1):
            assert f"rank {rank}: gloo threads after close: []" in proc.stdout, output
