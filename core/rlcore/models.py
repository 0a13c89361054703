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
CONTEXT = 4096
"""The embedded models' positions (rotary, so no parameter or output depends on it): room for the CPU recipes'
MATH and MBPP prompts, which the context-length check would otherwise refuse."""


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


def tiny_config(hidden: int = 64, layers: int = 2, heads: int = 2) -> Any:
    """The embedded default's config: a Qwen2 over the character tokenizer's vocabulary. Two heads of size 32,
    because vLLM's CPU attention has kernels for head sizes 32, 64, 80, ... only, so `rlcore run --rollout vllm`
    works on the default too."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(SPECIALS) + len(TINY_CHARS), hidden_size=hidden, intermediate_size=hidden * 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=CONTEXT,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )


def build_tiny_model(directory: Path, seed: int = 0, hidden: int = 64, layers: int = 2,
                     heads: int = 2) -> Path:
    """Build and save the embedded default: a seeded random Qwen2 (`tiny_config`) with the character tokenizer."""
    from transformers import Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(hidden, layers, heads))
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


def tiny_vl_tokenizer(tokenizer: str = "") -> Any:
    """The embedded VL model's tokenizer: the Qwen tokenizer in directory `tokenizer`, else a character-level one
    over printable ASCII; either with Qwen's chat and vision tokens, `<|im_end|>` as EOS and the VL chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

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
    return tok


def tiny_vl_config(tok: Any, hidden: int = 64, layers: int = 2, heads: int = 2) -> Any:
    """The embedded Qwen2.5-VL's config for tokenizer `tok`: a text model of `layers` layers and `heads` heads
    (2 of size 32 by default, a head size vLLM's CPU attention has kernels for), a 2-block vision tower."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in VL_TOKENS}
    half = hidden // heads // 2  # rotary pairs per head, split over (time, height, width) as Qwen2.5-VL does
    mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=CONTEXT, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[1], window_size=112),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=ids["<|im_end|>"])


def build_tiny_vl_model(directory: Path, seed: int = 0, tokenizer: str = "", hidden: int = 64, layers: int = 2,
                        heads: int = 2, max_pixels: int = 28 * 28 * 16) -> Path:
    """Build and save a seeded random Qwen2.5-VL (see `tiny_vl_config`) with its processor, offline:
    `tokenizer` names a Qwen tokenizer directory (e.g. the real Qwen3 / Qwen2.5 one), else a character-level
    tokenizer over printable ASCII plus Qwen's chat and vision tokens is written (`tiny_vl_tokenizer`).
    Images are resized to at most `max_pixels` (16 merged patches, so 16 image tokens, by default)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    tok = tiny_vl_tokenizer(tokenizer)
    try:  # the PIL image processor needs no torchvision (transformers' Qwen2-VL processor does, for videos)
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    images = ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=max_pixels)
    config = tiny_vl_config(tok, hidden, layers, heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
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
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    elif p.is_file():
        raise ConfigError(f"--model {model!r} is a file but not a GGUF model (.gguf): pass a transformers model "
                          "directory (config.json and weights) or a .gguf file")
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
    if not p.exists():
        try:
            return ModelSpec(path=model, tokenizer=load_tokenizer(model))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: all mean this id cannot be used here
            raise ConfigError(f"--model {model!r} is not a local path and cannot be loaded from the Hugging Face hub "
                              f"({_first_line(e)}): offline (HF_HUB_OFFLINE, no network) or no such model; pass a "
                              "local model directory or .gguf file") from e
    check_model_dir(p)
    try:
        tokenizer = load_tokenizer(str(p))
    except Exception as e:  # noqa: BLE001 - a broken or missing tokenizer is the model directory's problem
        raise ConfigError(f"--model {str(p)!r}: cannot load its tokenizer ({_first_line(e)}); the directory needs "
                          "the tokenizer files save_pretrained writes (tokenizer.json, tokenizer_config.json)") from e
    return ModelSpec(path=str(p), tokenizer=tokenizer)


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def check_model_dir(path: Path) -> None:
    """A one-line error when a transformers model directory has no weights, or a config.json this
    transformers cannot read (invalid JSON, an unknown `model_type`)."""
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ConfigError(f"--model {str(path)!r} has config.json but no weights (model.safetensors or "
                          "pytorch_model.bin): pass a complete model directory (save_pretrained writes both)")
    import transformers
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - every failure here is the config file's
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (ValueError, AttributeError):
            raise ConfigError(f"--model {str(path)!r}: config.json is not a valid JSON object ({_first_line(e)}); "
                              "restore it from the model's source") from e
        raise ConfigError(f"--model {str(path)!r}: config.json (model_type {model_type!r}) cannot be read by "
                          f"transformers {transformers.__version__} ({_first_line(e)}); upgrade transformers if the "
                          "architecture is newer, or fix config.json") from e


def read_config(model: str) -> Any | None:
    """The transformers config of `--model` without loading weights or building anything (the embedded models'
    configs are built in memory), or None when it cannot be read here (a hub id without network)."""
    from transformers import AutoConfig

    if not model:
        return tiny_config()
    if model == EMBEDDED_VL:
        return tiny_vl_config(tiny_vl_tokenizer())
    p = Path(model).expanduser()
    try:
        if p.is_file() and p.suffix == ".gguf":
            return _gguf_config(p.parent, p.name)
        if p.is_dir() and not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            return _gguf_config(p, ggufs[0].name) if len(ggufs) == 1 else None
        return AutoConfig.from_pretrained(str(p) if p.exists() else model)
    except (OSError, ValueError, ImportError):
        return None


def _gguf_config(directory: Path, name: str) -> Any | None:
    """The config in a GGUF file's header, or None when the header cannot be parsed (the run names a truncated
    or corrupt file when it loads the model)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, gguf_file=name)
    except Exception:  # noqa: BLE001 - the gguf reader raises struct, numpy and key errors on a bad header
        return None


def dequantize_gguf(directory: Path, gguf_file: str, out: Path) -> Path:
    """Convert a GGUF model to a plain transformers directory once (in the run directory), so every
    plugin loads fast safetensors instead of de-quantising the GGUF again."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM

    import importlib.util

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = load_tokenizer(str(directory), gguf_file)
    except Exception as e:  # noqa: BLE001 - a GGUF that cannot be read raises many types (struct.error, ValueError)
        where = str(directory / gguf_file)
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"--model {where!r}: reading GGUF files needs the gguf package: "
                              "pip install 'rlcore[gguf]'") from e
        raise ConfigError(f"--model {where!r}: cannot read the GGUF file ({_first_line(e)}); it is truncated or "
                          "corrupt (download it again), or holds an architecture transformers cannot de-quantize") from e
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
