"""One torchrun rank of `test_fsdp_teardown.py`: the fsdp worker of a 2-rank group gathers the policy, then
the group closes as in a run (rank 0 scatters `close`, every rank leaves the process group), each rank
prints the gloo threads still alive and the process exits at once, when an abort in teardown would happen.

    torchrun --standalone --nproc-per-node 2 tests/backends/fsdp_teardown_rank.py MODEL_DIR
"""

from __future__ import annotations

import os
import sys

import torch

from rlcore_backends.fsdp_backend import FSDPBackend
from rlcore_backends.fsdp_worker import FSDPWorker, RankSpec, torchrun_rank
from rlcore_backends.worker_group import TorchrunGroup, serve_ranks


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (its worker threads and its TCP event loop)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            continue  # a thread that ended while listing
    return sorted(n for n in names if "gloo" in n)


def main(model_dir: str) -> None:
    rank, local_rank, world_size = torchrun_rank()
    worker = FSDPWorker(RankSpec(model_path=model_dir, options=FSDPBackend.Options(), rank=rank,
                                 world_size=world_size, device=torch.device("cpu"), collective="gloo", seed=0))
    if rank == 0:
        group = TorchrunGroup(worker)
        state = group.call("full_state_dict", [{} for _ in range(world_size)])
        assert state and all(t.device.type == "cpu" for t in state.values())
        group.close()
    else:
        serve_ranks(worker)
    print(f"rank {rank}: gloo threads after close: {gloo_threads()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
