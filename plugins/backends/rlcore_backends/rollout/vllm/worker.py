"""Methods mixed into every vLLM worker (`worker_extension_cls`), called by name through `collective_rpc`,
and the two ways weights reach them in memory: a shared-memory block (same machine) or safetensors bytes.

The methods run inside vLLM's worker processes, so this module imports vLLM only inside them.
"""

from __future__ import annotations

import base64
import contextlib
import math
import mmap
import time
from collections.abc import Iterable, Iterator
from multiprocessing import shared_memory
from typing import Any

import torch
from torch import Tensor


class RLCoreWorkerExtension:
    """Weight loading from the trainer's tensors, with the CPU fixes a plain `load_weights` lacks."""

    def rlcore_load_weights(self, named_tensors: list[tuple[str, Tensor]]) -> float:
        """Load full weights given as (HF name, tensor) pairs in place; returns the seconds it took.

        Goes through the model runner's layerwise reload, which re-runs each layer's post-load processing
        (on CPU the linear weights are repacked; `model.load_weights` alone writes into emptied tensors).
        """
        start = time.perf_counter()
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        self._repack_tied_lm_head()
        return time.perf_counter() - start

    def rlcore_load_safetensors(self, data: str) -> float:
        """`rlcore_load_weights` from base64 safetensors text: how weights come through a server's JSON
        `/collective_rpc` route, which passes strings only."""
        from safetensors.torch import load

        return self.rlcore_load_weights(list(load(base64.b64decode(data)).items()))

    def rlcore_load_shared(self, block: str, layout: list[list[Any]]) -> float:
        """`rlcore_load_weights` from the shared-memory block `block` that `shared_weights` filled; `layout`
        holds [name, dtype, shape, offset] per tensor. The tensors are views of the block, not copies."""
        with attach(block) as data:
            named = [(name, view(data, dtype, shape, offset)) for name, dtype, shape, offset in layout]
            seconds = self.rlcore_load_weights(named)
            del named
        return seconds

    def rlcore_init_amx(self) -> bool:
        """Ask the kernel for AMX tile state before bf16 matmuls use it (else the first one can SIGILL)."""
        init = getattr(torch._C._cpu, "_init_amx", None)
        return bool(init()) if init is not None else False

    def _repack_tied_lm_head(self) -> None:
        """A tied lm_head keeps the weight packed before the reload on CPU: pack it again from the embedding."""
        from vllm.platforms import current_platform

        config = self.vllm_config.model_config.hf_config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        model: Any = self.model_runner.get_model()
        tied = getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
        # a vision-language model keeps its head in its language model (`language_model.lm_head`)
        head = next((m for name, m in model.named_modules() if name.split(".")[-1] == "lm_head"), None)
        if not (current_platform.is_cpu() and tied and head is not None and hasattr(head, "cpu_linear")):
            return
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(head, remove_weight=False)


def unique_tensors(named_tensors: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """The tensors by name, detached on the CPU; of tensors sharing storage (a tied lm_head and embedding)
    one is kept, not the lm_head: a tied model loads the embedding into both."""
    owner: dict[int, str] = {}
    tensors: dict[str, Tensor] = {}
    for name, tensor in named_tensors:
        storage = tensor.untyped_storage()
        key = storage.data_ptr() if storage.nbytes() else -len(tensors) - 1
        if key in owner:
            if not owner[key].startswith("lm_head"):
                continue
            del tensors[owner[key]]
        owner[key] = name
        tensors[name] = tensor.detach().to("cpu")
    return tensors


def safetensors_bytes(named_tensors: Iterable[tuple[str, Tensor]]) -> bytes:
    """The weights serialised to safetensors bytes in memory (for a server, whose RPC takes strings)."""
    from safetensors.torch import save

    return save({name: t.contiguous() for name, t in unique_tensors(named_tensors).items()})


@contextlib.contextmanager
def shared_weights(named_tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, list[list[Any]]]]:
    """Copy the weights into one new shared-memory block; yields its name and layout for `rlcore_load_shared`,
    and frees the block on exit."""
    tensors = unique_tensors(named_tensors)
    layout, offset = [], 0
    for name, t in tensors.items():
        layout.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
        offset += -(-t.numel() * t.element_size() // 64) * 64  # 64-byte aligned views for any dtype
    shm = shared_memory.SharedMemory(create=True, size=max(offset, 1))
    try:
        data = torch.frombuffer(shm.buf, dtype=torch.uint8)
        for (name, dtype, shape, start), t in zip(layout, tensors.values()):
            view(data, dtype, shape, start).copy_(t)
        del data
        yield shm.name, layout
    finally:
        shm.close()
        shm.unlink()


def view(data: Tensor, dtype: str, shape: list[int], offset: int) -> Tensor:
    """The tensor of `dtype` and `shape` stored at byte `offset` of the uint8 buffer `data`."""
    dt = getattr(torch, dtype)
    return data[offset:offset + math.prod(shape) * dt.itemsize].view(dt).view(shape)


@contextlib.contextmanager
def attach(block: str) -> Iterator[Tensor]:
    """The shared-memory block `block` as a uint8 tensor, mapped from /dev/shm (where Linux keeps POSIX shared
    memory) rather than through `SharedMemory`, whose resource tracker would claim, and later unlink, a block
    this process did not create. Views of it must be dropped before the context exits."""
    with open(f"/dev/shm/{block.lstrip('/')}", "r+b") as f, mmap.mmap(f.fileno(), 0) as buffer:
        data = torch.frombuffer(buffer, dtype=torch.uint8)
        yield data
        del data
