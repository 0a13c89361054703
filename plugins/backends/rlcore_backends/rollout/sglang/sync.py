"""Pushing the trainer's weights into SGLang: from tensors in buckets, by a broadcast group, or from disk.

- tensor (colocated): `update_weights_from_tensor` per bucket of at most `bucket_mb`; SGLang's serializer
  passes CUDA IPC handles, so the engine reads the trainer's GPU memory directly.
- distributed (disaggregated): this process joins SGLang's TP ranks in a NCCL group as rank 0
  (`init_weights_update_group`, once) and, per bucket, announces names/dtypes/shapes with
  `update_weights_from_distributed` while it broadcasts the tensors in that order.
- disk: safetensors into a directory, then `update_weights_from_disk` (works across machines).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from rlcore.errors import RLCoreError
from rlcore_backends.rollout.sglang.api import SGLangError

GROUP_NAME = "rlcore_weight_sync"


def buckets(tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Consecutive runs of named tensors of at most `bucket_bytes` together (a bigger tensor goes alone)."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in tensors:
        if bucket and size + nbytes([(name, tensor)]) > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes([(name, tensor)])
    if bucket:
        yield bucket


def cast(tensors: Iterable[tuple[str, Tensor]], dtype: torch.dtype | None,
         device: torch.device | None = None) -> Iterator[tuple[str, Tensor]]:
    """Detached tensors with floating ones cast to `dtype` (None: as they are), moved to `device` if given."""
    for name, tensor in tensors:
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        yield name, tensor.detach().to(device=device or tensor.device, dtype=target)


def bucket_stats(sizes: list[int]) -> dict[str, float]:
    """The sync metrics for buckets of these byte sizes."""
    return {"sync/buckets": float(len(sizes)), "sync/megabytes": sum(sizes) / 2**20}


def nbytes(bucket: list[tuple[str, Tensor]]) -> int:
    """Bytes of the tensors in `bucket`."""
    return sum(t.numel() * t.element_size() for _, t in bucket)


class TensorSync:
    """Colocated: `update_weights_from_tensor`, one call per bucket (the cache is flushed once after)."""

    def __init__(self, bucket_bytes: int, dtype: torch.dtype | None) -> None:
        self.bucket_bytes, self.dtype = bucket_bytes, dtype

    def push(self, engine: Any, tensors: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
        sizes = []
        for bucket in buckets(cast(tensors, self.dtype), self.bucket_bytes):
            engine.update_weights_from_tensor(bucket, flush_cache=False)
            sizes.append(nbytes(bucket))
        return bucket_stats(sizes)

    def close(self, engine: Any) -> None:
        """Nothing to release."""


class DiskSync:
    """Any placement: the weights as `model.safetensors` (plus the model's config) in `directory`, reloaded
    by the engine with `update_weights_from_disk` (the directory must be visible to the server)."""

    def __init__(self, directory: Path, model_path: str, dtype: torch.dtype | None) -> None:
        self.directory, self.model_path, self.dtype = directory, Path(model_path), dtype

    def push(self, engine: Any, tensors: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            if (self.model_path / name).is_file():
                shutil.copyfile(self.model_path / name, self.directory / name)
        state, seen = {}, set()
        for name, tensor in cast(tensors, self.dtype, torch.device("cpu")):
            ptr = tensor.untyped_storage().data_ptr()
            state[name] = tensor.clone() if ptr in seen else tensor.contiguous()  # tied weights share storage
            seen.add(ptr)
        save_file(state, str(self.directory / "model.safetensors"))
        engine.update_weights_from_disk(str(self.directory.resolve()))
        return bucket_stats([nbytes(list(state.items()))])

    def close(self, engine: Any) -> None:
        """Nothing to release (the directory stays in the run directory)."""


def sglang_process_group() -> Callable[..., Any]:
    """SGLang's `init_custom_process_group`: a group apart from any default one, as its engine side uses."""
    try:
        from sglang.srt.utils import init_custom_process_group
    except ImportError as e:
        raise RLCoreError(f"rollout.sync=distributed builds its NCCL group with SGLang's helper ({e}): install "
                          "SGLang in the trainer's environment (pip install 'rlcore-backends[sglang]') or use "
                          "rollout.sync=disk") from None
    return init_custom_process_group


class DistributedSync:
    """Disaggregated: this process is rank 0 of a group with the server's `tp_size` ranks (ranks 1..tp)."""

    def __init__(self, address: str, port: int, tp_size: int, backend: str, device: torch.device,
                 bucket_bytes: int, dtype: torch.dtype | None, timeout: float) -> None:
        self.address, self.port, self.world_size, self.backend = address, port, tp_size + 1, backend
        self.device, self.bucket_bytes, self.dtype, self.timeout = device, bucket_bytes, dtype, timeout
        self.group: Any = None

    def connect(self, engine: Any) -> None:
        """Join as rank 0 (in a daemon thread: it returns once every rank joined) while asking the engine to
        join; a refused request fails at once rather than after the rendezvous timeout."""
        make_group = sglang_process_group()
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                joined["group"] = make_group(backend=self.backend, init_method=f"tcp://{self.address}:{self.port}",
                                             world_size=self.world_size, rank=0, group_name=GROUP_NAME,
                                             timeout=timedelta(seconds=self.timeout))
            except Exception as e:  # noqa: BLE001 - re-raised in the calling thread
                joined["error"] = e

        thread = threading.Thread(target=join, daemon=True)
        thread.start()
        engine.init_weights_update_group(self.address, self.port, 1, self.world_size, GROUP_NAME, self.backend)
        thread.join(self.timeout)
        if "group" not in joined:
            raise SGLangError(f"could not form the weight-update group at {self.address}:{self.port} "
                              f"({joined.get('error', 'timed out')}): set rollout.group_address to an address of "
                              "this machine that the server can reach") from None
        self.group = joined["group"]

    def push(self, engine: Any, tensors: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
        if self.group is None:
            self.connect(engine)
        sizes = []
        for bucket in buckets(cast(tensors, self.dtype, self.device), self.bucket_bytes):
            names = [n for n, _ in bucket]
            dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
            shapes = [list(t.shape) for _, t in bucket]
            with ThreadPoolExecutor(1) as pool:
                received = pool.submit(engine.update_weights_from_distributed, names, dtypes, shapes, GROUP_NAME,
                                       False)
                sent = [t.contiguous() for _, t in bucket]  # kept alive until every broadcast completed
                works = [torch.distributed.broadcast(t, src=0, group=self.group, async_op=True) for t in sent]
                try:
                    received.result()
                except SGLangError as e:
                    raise SGLangError(f"{e}; the weight-update group is now out of step: restart the server") from None
                for work in works:
                    work.wait()
            sizes.append(nbytes(bucket))
        return bucket_stats(sizes)

    def close(self, engine: Any) -> None:
        """Leave the group on both sides (older servers without `/destroy_weights_update_group` keep theirs)."""
        if self.group is None:
            return
        try:
            engine.destroy_weights_update_group(GROUP_NAME)
        except SGLangError:
            pass  # teardown goes on: a stopped server has no group left to destroy
        torch.distributed.destroy_process_group(self.group)
        self.group = None
