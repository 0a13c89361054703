"""Methods mixed into every vLLM worker (`worker_extension_cls`), called by name through `collective_rpc`.

They run inside vLLM's worker processes (or the trainer's process with the in-process engine), so
this module imports vLLM only inside the methods and nothing of rlcore's rollout.
"""

from __future__ import annotations

import time
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

    def rlcore_load_safetensors(self, data: bytes) -> float:
        """`rlcore_load_weights` from an in-memory safetensors blob (how weights travel over HTTP)."""
        from safetensors.torch import load

        return self.rlcore_load_weights(list(load(bytes(data)).items()))

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
        if not (current_platform.is_cpu() and getattr(text, "tie_word_embeddings", False)
                and hasattr(model, "lm_head") and hasattr(model.lm_head, "cpu_linear")):
            return
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def safetensors_bytes(named_tensors: list[tuple[str, Tensor]]) -> bytes:
    """Serialise (name, tensor) pairs to safetensors bytes in memory; of tensors sharing storage (a tied
    lm_head and embedding) only the first is kept, which the engine's tied model loads into both."""
    from safetensors.torch import save

    seen: set[int] = set()
    unique = {}
    for name, tensor in named_tensors:
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            unique[name] = tensor.detach().to("cpu").contiguous()
    return save(unique)
