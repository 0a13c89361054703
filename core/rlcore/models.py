"""Resolving `--model` into a loadable model and tokenizer, and the embedded default model.

`--model` takes a transformers model directory, a GGUF file (or a directory holding one), or a hub id
where a network exists. With no `--model`, the core builds a tiny seeded Qwen2 model and a
character-level tokenizer offline into the run directory, so `rlcore run` works with nothing
downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
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
                     heads: int = 2) -> Path:
    """Build and save the embedded default: a seeded random Qwen2 with the character tokenizer.

    Two heads of size 32, because vLLM's CPU attention has kernels for head sizes 32, 64, 80, ... only, so
    `rlcore run --rollout vllm` works on the default too."""
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


EMBEDDED_VL = "embedded:qwen2.5-vl"
"""`--model` value for the embedded vision-language default: a tiny seeded random Qwen2.5-VL (see
`build_tiny_vl_model`), built offline into the run directory like the text default."""
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen2-VL's chat template (images as `<|vision_start|><|image_pad|><|vision_end|>`, which the processor
expands to one pad per merged image patch); video and vision ids left out."""
VL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def build_tiny_vl_model(directory: Path, seed: int = 0, tokenizer: str = "", hidden: int = 64, layers: int = 2,
                        max_pixels: int = 28 * 28 * 16) -> Path:
    """Build and save a seeded random Qwen2.5-VL (2-layer text model, 2-block vision tower) with its
    processor, offline: `tokenizer` names a Qwen tokenizer directory (e.g. the real Qwen3 / Qwen2.5 one),
    else a character-level tokenizer over printable ASCII plus Qwen's chat and vision tokens is written.
    Images are resized to at most `max_pixels` (16 merged patches, so 16 image tokens, by default)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)

    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        chars = [chr(c) for c in range(32, 127)] + ["\n"]
        tok_model = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + tuple(chars))},
                                               unk_token="<unk>"))
        tok_model.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok_model.decoder = decoders.Fuse()
        tok = PreTrainedTokenizerFast(tokenizer_object=tok_model, pad_token="<pad>", eos_token="<|im_end|>",
                                      unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": [t for t in VL_TOKENS if t not in tok.get_vocab()]})
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else "<pad>"
    tok.eos_token = "<|im_end|>"
    tok.chat_template = VL_CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in VL_TOKENS}
    try:  # the PIL image processor needs no torchvision (transformers' Qwen2-VL processor does, for videos)
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    images = ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=max_pixels)
    heads = 4
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[1], window_size=112),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=ids["<|im_end|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(directory)
    images.save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    return directory


EMBEDDED_TOOLS = "embedded:tools"
"""`--model` value for the embedded tool-calling default: a tiny seeded random model whose tokenizer and chat
template speak Qwen's chat and hermes tool-call format (see `build_tiny_tool_model`), built offline into the
run directory like the text default."""
TOOL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content %}{{- message.content }}{%- if message.tool_calls %}{{- '\n' }}{%- endif %}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set call = call.function if call.function is defined else call %}"
    "{%- if not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + call.name + '\", \"arguments\": ' + (call.arguments | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
"""Qwen2.5's chat layout and hermes tool calls (`<tool_call>` JSON, answers as `<tool_response>` blocks in a
user turn), without Qwen's system prompt that lists the offered tools: a 100K-parameter model learns its
tools from demonstrations (`rlcore warmstart`), and the listing would be hundreds of characters of context."""
TOOL_PIECES = ('{"name": "', '", "arguments": {"', '": "', '"}}', "calculator", "expression", "system", "user",
               "assistant")
"""Multi-character tokens of the embedded tool tokenizer, as a BPE vocabulary merges common words: a hermes
calculator call is 18 tokens rather than 70 characters."""


def build_tiny_tool_tokenizer(directory: Path) -> Any:
    """Write a character-level tokenizer over printable ASCII and newline, with Qwen's chat tokens (special,
    `<|im_end|>` ends a turn), its tool tags and `TOOL_PIECES` (not special: decoded text keeps them)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(("<pad>", "<unk>", *chars))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # newlines too, one by one
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in
                    ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", *TOOL_PIECES)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = TOOL_CHAT_TEMPLATE
    fast.save_pretrained(directory)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return fast


def build_tiny_tool_model(directory: Path, seed: int = 0, hidden: int = 128, layers: int = 2, heads: int = 4) -> Path:
    """Build and save the embedded tool-calling default: a seeded random Llama-architecture model (~0.5M
    parameters; heads of size 32, which vLLM's CPU attention supports; untied embeddings) with the tokenizer of
    `build_tiny_tool_tokenizer`. Llama rather than Qwen2 because transformers reloads any `qwen2` model's
    tokenizer as Qwen2's own, which drops this one's newline token. It writes tool calls only after a warm
    start on demonstrations (`rlcore warmstart`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tool_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(directory)
    return directory


def launch_rank() -> int:
    """This process's rank when a launcher (torchrun) started one `rlcore run` per rank, else 0."""
    return int(os.environ.get("RANK", "0"))


def build_model_dir(path: Path, build: Callable[[Path], Any], timeout_s: float = 1800.0) -> None:
    """Create the model directory `path` with `build(directory)` unless it holds a config.json: into a
    temporary sibling renamed into place, so a reader never sees half a model. Under torchrun only rank 0
    builds; the other ranks wait until it has."""
    if (path / "config.json").exists():
        return
    if launch_rank() != 0:
        deadline = time.monotonic() + timeout_s
        while not (path / "config.json").exists():
            if time.monotonic() > deadline:
                raise ConfigError(f"rank 0 did not build the model in {path} within {timeout_s:g} s")
            time.sleep(0.2)
        return
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    shutil.rmtree(path, ignore_errors=True)  # an incomplete earlier build
    tmp.replace(path)


def resolve(model: str, run_dir: Path, seed: int) -> ModelSpec:
    """Turn the `trainer.model` option into a ModelSpec with its tokenizer loaded."""
    if not model:
        path = run_dir / "model"
        build_model_dir(path, lambda d: build_tiny_model(d, seed=seed))
        return ModelSpec(path=str(path), tokenizer=load_tokenizer(str(path)))
    embedded = {EMBEDDED_VL: build_tiny_vl_model, EMBEDDED_TOOLS: build_tiny_tool_model}
    if model in embedded:
        path = run_dir / "model"
        build_model_dir(path, lambda d: embedded[model](d, seed=seed))
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
        local = run_dir / "model"
        build_model_dir(local, lambda d: dequantize_gguf(p, gguf_file, d))
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
    """Load the policy as a transformers causal LM (or image-text-to-text model, e.g. Qwen2.5-VL) on `device`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype)
    except ValueError as e:  # "Unrecognized configuration class": a vision-language model
        if "Unrecognized configuration class" not in str(e):
            raise
        model = AutoModelForImageTextToText.from_pretrained(spec.path, dtype=dtype)
    return model.to(device)
