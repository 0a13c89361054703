"""`rlcore convert --to native`: Hugging Face weights -> a Megatron-LM checkpoint written by megatron-core itself.

tp x pp processes (gloo) each build their slice of `GPTModel` on the CPU, load its Hugging Face weights
(`convert.shard_from_hf`) and save together through `dist_checkpointing` (see `checkpoint`), as a `release`
checkpoint that Megatron-LM, or this backend, loads at any tp x pp. No forward pass runs, so no GPU is needed;
every process holds its slice in float32 (a 32B model needs about 128 GB of memory in all).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import attrs
import torch
import torch.distributed as dist

from rlcore_backends.update.megatron import checkpoint as ckpt
from rlcore_backends.update.megatron.convert import Layout, shard_from_hf
from rlcore_backends.update.megatron.model import build_gpt, load_shard, transformer_config
from rlcore_backends.update.megatron.pool import WorkerPool, free_address


@attrs.frozen
class ConvertSpec:
    source: str
    tp: int
    pp: int
    address: str


class Converter:
    """One rank of a conversion: its process group and its slice of the model with the Hugging Face weights."""

    def __init__(self, rank: int, spec: ConvertSpec) -> None:
        from megatron.core import parallel_state

        dist.init_process_group("gloo", init_method=spec.address, rank=rank, world_size=spec.tp * spec.pp)
        parallel_state.initialize_model_parallel(spec.tp, spec.pp)
        self.hf = ckpt.hf_config(Path(spec.source))
        self.layout = Layout.from_hf_config(self.hf, spec.tp, spec.pp)
        config = transformer_config(self.hf, self.layout, sequence_parallel=False, recompute=False,
                                    bf16_autocast=False, on_cpu=True)
        self.model = build_gpt(self.hf, self.layout, config, transformer_engine=False)
        shard = shard_from_hf(self.layout, ckpt.SafetensorsReader(Path(spec.source)),
                              parallel_state.get_tensor_model_parallel_rank(),
                              parallel_state.get_pipeline_model_parallel_rank())
        load_shard(self.model, shard, transformer_engine=False)

    def save(self, out: Path) -> None:
        ckpt.save_model(self.model, out, self.layout, self.hf, steps=None)

    def close(self) -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def host_copies_only() -> None:
    """In a conversion process on a machine without CUDA: megatron-core's checkpoint writer waits for
    device-to-host copies (`torch.cuda.synchronize()`), of which there are none (every tensor is on the CPU), and
    puts its failure flag for the all-reduce on `torch.cuda.current_device()`, which is then the CPU (gloo)."""
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: torch.device("cpu")


def hf_to_native(source: Path, out: Path, tp: int, pp: int, timeout: float = 3600.0) -> Path:
    """Convert a Hugging Face model directory to a Megatron-LM checkpoint (weights only), sliced over tp x pp
    processes while converting; the checkpoint itself loads at any tp x pp."""
    layout = Layout.from_hf_config(ckpt.hf_config(source), tp, pp)
    out.mkdir(parents=True, exist_ok=True)
    spec = ConvertSpec(source=str(source), tp=tp, pp=pp, address=free_address())
    pool = WorkerPool(partial(Converter, spec=spec), tp * pp, timeout, host_copies_only)
    try:
        pool.run(Converter.save, out)
    finally:
        pool.close()
    ckpt.write_hf_files(source, out / ckpt.HF_DIR)
    ckpt.write_meta(out, layout, 0)
    return out
