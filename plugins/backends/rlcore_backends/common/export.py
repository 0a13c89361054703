"""Writing a policy as a transformers model directory, for checkpoints and `rlcore export`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from rlcore import ModelSpec
from rlcore.models import load_model

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")
"""Files of a model directory that hold its processor (images) rather than its weights or tokenizer."""


def write_model_dir(model: Any, tokenizer: Any, out: Path) -> Path:
    """Save `model` (safetensors, config, generation config) and `tokenizer` into `out`, which
    `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` then load."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        source = Path(getattr(tokenizer, "name_or_path", "") or "")
        for name in PROCESSOR_FILES:  # a vision-language model's image processor goes with it
            if source.is_dir() and (source / name).is_file() and source.resolve() != out.resolve():
                shutil.copyfile(source / name, out / name)
    return out


def load_cpu_model(path: Path | str) -> Any:
    """A float32 causal LM from a model directory, on the CPU (for exporting without a device)."""
    return load_model(ModelSpec(path=str(path)), torch.float32, "cpu")
