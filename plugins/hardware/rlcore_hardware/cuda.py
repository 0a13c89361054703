"""Placement on NVIDIA GPUs: one device per local rank, NCCL collectives, CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os

import torch

from rlcore import hookimpl
from rlcore.errors import RLCoreError

GIB = 1024**3
VISIBLE = "CUDA_VISIBLE_DEVICES"


class CUDA:
    """NVIDIA GPUs through torch.cuda; `--hardware auto` picks it where a GPU is visible."""

    @hookimpl
    def hardware_available(self) -> bool:
        return torch.cuda.is_available()

    @hookimpl
    def device(self, local_rank: int) -> torch.device:
        """GPU `local_rank` of those visible; a clear error where there is none."""
        visible = f" ({VISIBLE}={os.environ[VISIBLE]!r})" if VISIBLE in os.environ else ""
        count = self.device_count()
        if count == 0:
            raise RLCoreError(f"no CUDA device visible{visible}: torch.cuda.is_available() is False "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --hardware cpu")
        if not 0 <= local_rank < count:
            raise RLCoreError(f"local rank {local_rank} has no GPU: {count} CUDA device(s) visible{visible}; "
                              "start at most one process per visible GPU")
        return torch.device("cuda", local_rank)

    @hookimpl
    def device_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    @hookimpl
    def collective_backend(self) -> str:
        return "nccl"

    @hookimpl
    def visible_devices_env(self) -> str | None:
        return VISIBLE

    @hookimpl
    def resource_name(self) -> str:
        return "GPU"

    @hookimpl
    def memory_stats(self) -> dict[str, float]:
        """Tensor memory on the current GPU now (`used_gib`), at its peak (`peak_gib`), and held by
        the caching allocator (`reserved_gib`); empty without a GPU."""
        if not torch.cuda.is_available():
            return {}
        return {"used_gib": torch.cuda.memory_allocated() / GIB,
                "peak_gib": torch.cuda.max_memory_allocated() / GIB,
                "reserved_gib": torch.cuda.memory_reserved() / GIB}

    @hookimpl
    def empty_cache(self) -> bool:
        """Return cached blocks to the driver (a no-op without a GPU)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    @hookimpl
    def manual_seed(self, seed: int) -> bool:
        """Seed every GPU's generator (queued lazily when CUDA is not initialised yet)."""
        torch.cuda.manual_seed_all(seed)
        return True
