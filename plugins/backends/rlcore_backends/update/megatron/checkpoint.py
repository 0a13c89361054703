"""Megatron checkpoints on disk: one file per rank, plus the Hugging Face config needed to convert back.

    <dir>/megatron.json                       {"tp", "pp", "steps"}
    <dir>/hf/                                 config.json (+ generation config, tokenizer): no weights
    <dir>/mp_rank_<tp:02d>_<pp:03d>/model_optim_rng.pt
                                              {"model": this rank's shard (GPTModel local-spec names),
                                               "optimizer", "scheduler" (training checkpoints only)}

Per-rank directories are named as in Megatron-LM's torch checkpoints; `rlcore convert` writes the same
layout without optimizer state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from rlcore.errors import ConfigError
from rlcore_backends.update.megatron.convert import Layout, hf_from_shards, shard_from_hf

META = "megatron.json"
HF_DIR = "hf"


def rank_file(directory: Path, tp_rank: int, pp_rank: int) -> Path:
    return Path(directory) / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" / "model_optim_rng.pt"


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
    """The layout and step count of a Megatron checkpoint written by this backend."""
    meta_path = Path(directory) / META
    if not meta_path.is_file():
        raise ConfigError(f"{directory} is not a Megatron checkpoint of rlcore (no {META})")
    meta = json.loads(meta_path.read_text())
    return Layout.from_hf_config(hf_config(Path(directory) / HF_DIR), meta["tp"], meta["pp"]), int(meta["steps"])


def hf_to_native(source: Path, out: Path, tp: int, pp: int) -> Path:
    """Convert a Hugging Face model directory to a Megatron checkpoint at tp x pp (weights only)."""
    layout = Layout.from_hf_config(hf_config(source), tp, pp)
    read = SafetensorsReader(source)
    for tp_rank, pp_rank in layout.ranks():
        path = rank_file(out, tp_rank, pp_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": shard_from_hf(layout, read, tp_rank, pp_rank)}, path)
    write_hf_files(source, out / HF_DIR)
    write_meta(out, layout, 0)
    return out


def read_shards(directory: Path, layout: Layout) -> dict[tuple[int, int], Mapping[str, Tensor]]:
    """Every rank's model shard of a Megatron checkpoint."""
    return {(t, p): torch.load(rank_file(directory, t, p), map_location="cpu", weights_only=True)["model"]
            for t, p in layout.ranks()}


def write_hf(tensors: Mapping[str, Tensor], config_dir: Path, out: Path) -> Path:
    """A transformers model directory: `tensors` as safetensors plus config and tokenizer files from `config_dir`."""
    from huggingface_hub import save_torch_state_dict

    out.mkdir(parents=True, exist_ok=True)
    for path in config_dir.iterdir():
        if path.is_file():
            (out / path.name).write_bytes(path.read_bytes())
    save_torch_state_dict(dict(tensors), out)
    return out


def native_to_hf(source: Path, out: Path) -> Path:
    """Convert a Megatron checkpoint (from `hf_to_native` or the backend's `save_state`) to a transformers
    model directory."""
    layout, _ = read_layout(source)
    return write_hf(hf_from_shards(layout, read_shards(source, layout)), source / HF_DIR, out)
