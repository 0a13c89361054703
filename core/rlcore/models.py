"""Resolving `--model` into a loadable model and tokenizer, and the embedded default model.

`--model` takes a transformers model directory, a GGUF file (or a directory holding one), or a hub id
where a network exists. With no `--model`, the core builds a tiny seeded Qwen2 model and a
character-level tokenizer offline into the run directory, so `rlcore run` works with nothing
downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlcore.errors import ConfigError
from rlcore.types import ModelSpec

TINY_CHARS = "0123456789+-*="
"""The embedded tokenizer's alphabet: enough for the arithmetic task's compact prompts and answers."""
SPECIALS = ("<pad>", "<eos>", "<unk>")


def build_tiny_tokenizer(directory: Path) -> None:
    """Write a character-level tokenizer (with a trivial chat template) to `directory`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(TINY_CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(directory)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def build_tiny_model(directory: Path, seed: int = 0, hidden: int = 64, layers: int = 2,
                     heads: int = 4) -> Path:
    """Build and save the embedded default: a seeded random Qwen2 with the character tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(directory)
    vocab = len(SPECIALS) + len(TINY_CHARS)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.save_pretrained(directory)
    return directory


def resolve(model: str, run_dir: Path, seed: int) -> ModelSpec:
    """Turn the `trainer.model` option into a ModelSpec with its tokenizer loaded."""
    if not model:
        path = run_dir / "model"
        if not (path / "config.json").exists():
            build_tiny_model(path, seed=seed)
        return ModelSpec(path=str(path), tokenizer=load_tokenizer(str(path)))
    p = Path(model).expanduser()
    gguf_file = None
    if p.is_file() and p.suffix == ".gguf":
        p, gguf_file = p.parent, p.name
    elif p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            gguf_file = ggufs[0].name
        elif not ggufs:
            raise ConfigError(f"--model {model!r}: directory has neither config.json nor a .gguf file; "
                              "pass a transformers model directory or a GGUF file")
        else:
            raise ConfigError(f"--model {model!r}: directory holds several .gguf files; pass one file")
    elif not p.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise ConfigError(f"--model {model!r} does not exist: pass a local model directory, a .gguf file, "
                          "or a hub id such as Qwen/Qwen2.5-0.5B-Instruct (needs network)")
    if gguf_file:
        local = dequantize_gguf(p, gguf_file, run_dir / "model")
        return ModelSpec(path=str(local), tokenizer=load_tokenizer(str(local)))
    path = str(p) if p.exists() else model
    return ModelSpec(path=path, tokenizer=load_tokenizer(path))


def dequantize_gguf(directory: Path, gguf_file: str, out: Path) -> Path:
    """Convert a GGUF model to a plain transformers directory once (in the run directory), so every
    plugin loads fast safetensors instead of de-quantising the GGUF again."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = load_tokenizer(str(directory), gguf_file)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"--model {str(directory / gguf_file)!r}: cannot load the GGUF file ({e}); "
                          "install the GGUF extra: pip install 'rlcore[gguf]'") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)
    return out


def load_tokenizer(path: str, gguf_file: str | None = None) -> Any:
    """Load a tokenizer for batched generation: left padding, a pad token distinct from EOS if possible."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_model(spec: ModelSpec, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Any:
    """Load the policy as a transformers causal LM on `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype)
    return model.to(device)
