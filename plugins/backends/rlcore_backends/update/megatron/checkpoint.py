"""Megatron checkpoints on disk in Megatron-LM's layout, written and read through megatron-core's
`dist_checkpointing` (the `torch_dist` format Megatron-LM's `--ckpt-format torch_dist` loads):

    <dir>/latest_checkpointed_iteration.txt   the iteration (training checkpoints), or "release" (converted)
    <dir>/iter_<steps:07d>/ or <dir>/release/ the model's sharded state dict (`GPTModel.sharded_state_dict()`,
                                              Megatron's own keys, resharded on load to any tp x pp) and its
                                              common state: `checkpoint_version` 3.0, `iteration`, `args`
    <dir>/megatron.json                       {"tp", "pp", "steps"} of the run that wrote it
    <dir>/hf/                                 config.json (+ generation config, tokenizer): no weights
    <dir>/rlcore/rank_<tp:02d>_<pp:03d>.pt    training checkpoints only: each rank's AdamW and scheduler state and
                                              step count (rlcore's torch optimizer, not Megatron's distributed one)

Megatron-LM loads the model with `--load <dir>` (or `--pretrained-checkpoint <dir> --finetune`) at any tp x pp;
`rlcore convert --to native` writes a `release` checkpoint without `rlcore/`, `--to hf` reads either back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from rlcore.errors import ConfigError
from rlcore_backends.update.megatron.convert import Layout, hf_from_shards

META = "megatron.json"
HF_DIR = "hf"
TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
TE_TO_LOCAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
"""Megatron's checkpoint keys of the pre-attention and pre-MLP norms (Transformer Engine's fused names, which
the local layer spec also saves under) -> rlcore's canonical local-spec names."""


def iteration_dir(directory: Path, steps: int | None) -> Path:
    """The directory Megatron-LM reads an iteration from: `iter_<steps:07d>`, or `release` (None)."""
    return Path(directory) / (RELEASE if steps is None else f"iter_{steps:07d}")


def checkpoint_dir(directory: Path) -> Path:
    """The iteration directory a checkpoint's tracker file names."""
    tracker = Path(directory) / TRACKER
    if not tracker.is_file():
        raise ConfigError(f"{directory} is not a Megatron checkpoint of rlcore (no {TRACKER})")
    text = tracker.read_text().strip()
    return iteration_dir(directory, None if text == RELEASE else int(text))


def rank_state_file(directory: Path, tp_rank: int, pp_rank: int) -> Path:
    """A rank's optimizer, scheduler and step count (training checkpoints)."""
    return Path(directory) / "rlcore" / f"rank_{tp_rank:02d}_{pp_rank:03d}.pt"


def common_state(layout: Layout, hf: Any, steps: int | None) -> dict[str, Any]:
    """What Megatron-LM's checkpoints hold beside the model: the version, the iteration and the arguments it
    compares against its own (`check_checkpoint_args`) or reads with `--use-checkpoint-args`."""
    args = SimpleNamespace(
        num_layers=layout.layers, hidden_size=layout.hidden, ffn_hidden_size=layout.ffn,
        num_attention_heads=layout.heads, num_query_groups=layout.kv_heads, group_query_attention=True,
        kv_channels=layout.head_dim, max_position_embeddings=hf.max_position_embeddings,
        position_embedding_type="rope", add_position_embedding=False, normalization="RMSNorm",
        norm_epsilon=hf.rms_norm_eps, swiglu=True, add_bias_linear=False, add_qkv_bias=layout.qkv_bias,
        qk_layernorm=layout.qk_norm, untie_embeddings_and_output_weights=not layout.tied,
        padded_vocab_size=layout.padded_vocab, tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp, ckpt_format="torch_dist", iteration=steps or 0)
    return {"checkpoint_version": 3.0, "iteration": steps or 0, "args": args}


def save_model(model: torch.nn.Module, directory: Path, layout: Layout, hf: Any, steps: int | None) -> None:
    """Every rank's part of the model as one `dist_checkpointing` checkpoint in Megatron-LM's iteration
    directory, and the tracker file (collective: every rank of the model calls it)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    path = iteration_dir(directory, steps)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), **common_state(layout, hf, steps)}, str(path))
    if dist.get_rank() == 0:
        (Path(directory) / TRACKER).write_text(RELEASE if steps is None else str(steps))
    dist.barrier()


def load_model(model: torch.nn.Module, directory: Path) -> None:
    """Load the model's part of a `dist_checkpointing` checkpoint (any tp x pp it was saved at) into it."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint_dir(directory)))
    model.load_state_dict(state["model"])


def model_dir(path: str) -> Path:
    """A local directory holding the model's safetensors: `path` itself, or a hub snapshot of it."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))


class SafetensorsReader:
    """Reads tensors by Hugging Face name from a model directory's safetensors files, one at a time."""

    def __init__(self, directory: Path) -> None:
        self.files: dict[str, Path] = {}
        for path in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                self.files.update({name: path for name in f.keys()})
        if not self.files:
            raise ConfigError(f"backend megatron: {directory} has no *.safetensors weights "
                              "(save the model with save_pretrained(safe_serialization=True))")

    def __call__(self, name: str) -> Tensor:
        if name not in self.files:
            raise ConfigError(f"backend megatron: the model has no tensor {name!r}; is it a Qwen2/Qwen3/Llama model?")
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)


def hf_config(directory: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory)


def write_hf_files(source: Path, out: Path, tokenizer: Any = None) -> None:
    """Config, generation config and tokenizer of the model in `source` into `out` (no weights)."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    hf_config(source).save_pretrained(out)
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(out)
    except OSError:
        pass  # the model has no generation config
    if tokenizer is None:
        from rlcore.models import load_tokenizer

        try:
            tokenizer = load_tokenizer(str(source))
        except (OSError, ValueError):
            return  # weights-only directory
    tokenizer.save_pretrained(out)


def write_meta(directory: Path, layout: Layout, steps: int) -> None:
    (Path(directory) / META).write_text(json.dumps({"tp": layout.tp, "pp": layout.pp, "steps": steps}))


def read_layout(directory: Path) -> tuple[Layout, int]:
    """The layout and step count of a Megatron checkpoint written by rlcore."""
    meta_path = Path(directory) / META
    if not meta_path.is_file():
        raise ConfigError(f"{directory} is not a Megatron checkpoint of rlcore (no {META})")
    meta = json.loads(meta_path.read_text())
    return Layout.from_hf_config(hf_config(Path(directory) / HF_DIR), meta["tp"], meta["pp"]), int(meta["steps"])


def canonical_from_plain(layout: Layout, plain: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tp=1, pp=1 canonical shard (see `convert`) from a checkpoint's whole tensors (`load_plain_tensors`:
    decoder tensors stacked over the layers, under Megatron's checkpoint keys)."""
    out: dict[str, Tensor] = {}
    for key, tensor in plain.items():
        if not key.startswith("decoder.layers."):
            out[key] = tensor
            continue
        name = key.removeprefix("decoder.layers.")
        name = TE_TO_LOCAL.get(name, name)
        for i in range(layout.layers):
            out[f"decoder.layers.{i}.{name}"] = tensor[i].clone()
    return out


def write_hf(tensors: Mapping[str, Tensor], config_dir: Path, out: Path) -> Path:
    """A transformers model directory: `tensors` as safetensors plus config and tokenizer files from `config_dir`."""
    from huggingface_hub import save_torch_state_dict

    out.mkdir(parents=True, exist_ok=True)
    for path in config_dir.iterdir():
        if path.is_file():
            (out / path.name).write_bytes(path.read_bytes())
    save_torch_state_dict(dict(tensors), out)
    return out


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """A one-process gloo group for megatron-core's checkpoint reader (it asks for ranks) where none exists."""
    import torch.distributed as dist

    from rlcore_backends.update.megatron.pool import free_address

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=free_address(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def native_to_hf(source: Path, out: Path) -> Path:
    """A Megatron checkpoint (the backend's `save_state` or `hf_to_native`, or any torch_dist checkpoint of the
    same model with rlcore's `hf/` and `megatron.json` beside it) as a transformers model directory."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    read_layout(source)
    whole = Layout.from_hf_config(hf_config(Path(source) / HF_DIR), 1, 1)
    with process_group():
        plain = {k: v for k, v in load_plain_tensors(str(checkpoint_dir(source))).items() if torch.is_tensor(v)}
    return write_hf(hf_from_shards(whole, {(0, 0): canonical_from_plain(whole, plain)}), Path(source) / HF_DIR, out)
