"""Hugging Face <-> Megatron weight conversion: bit-exact round trips at every tp x pp and vocabulary padding (pure
tensor code), checkpoint files through megatron-core and the `convert_checkpoint` hook (slow), input packing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config

from rlcore.errors import ConfigError
from rlcore.models import build_tiny_tokenizer
from rlcore.testing import make_batch
from rlcore_backends.update.megatron import checkpoint as ckpt
from rlcore_backends.update.megatron.backend import MegatronBackend
from rlcore_backends.update.megatron.convert import Layout, hf_from_shards, shard_from_hf
from rlcore_backends.update.megatron.inputs import pack
from rlcore_backends.update.megatron.model import rope_settings

COMMON = dict(vocab_size=17, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False),
}
"""Grouped-query attention everywhere; qkv bias (Qwen2), tied embeddings (Llama), q/k norms and a head_dim
other than hidden / heads (Qwen3); a vocabulary no tp > 1 divides."""


def save_model(config: Any, directory: Path, seed: int = 0) -> Path:
    """A seeded random model with random (not default) norm weights, plus the character tokenizer."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_()
    model.save_pretrained(directory)
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    read = ckpt.SafetensorsReader(directory)
    return {name: read(name) for name in read.files}


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (2, 4)])
def test_round_trip_is_bit_exact(hf_dir: Path, tp: int, pp: int) -> None:
    layout = Layout.from_hf_config(ckpt.hf_config(hf_dir), tp, pp)
    original = hf_tensors(hf_dir)
    shards = {rank: shard_from_hf(layout, original.__getitem__, *rank) for rank in layout.ranks()}
    back = hf_from_shards(layout, shards)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_shards_split_the_weights(hf_dir: Path) -> None:
    """Each rank holds 1/tp of the split tensors and only its stage's layers; padded vocab rows are zero."""
    layout = Layout.from_hf_config(ckpt.hf_config(hf_dir), 2, 2)
    read = ckpt.SafetensorsReader(hf_dir)
    first, last = shard_from_hf(layout, read, 1, 0), shard_from_hf(layout, read, 1, 1)
    assert layout.padded_vocab == 18 and layout.vocab_shard == 9
    embed = first["embedding.word_embeddings.weight"]
    assert embed.shape == (9, 32) and torch.equal(embed[-1], torch.zeros(32))
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers.")} == {"0", "1"}
    assert "decoder.final_layernorm.weight" not in first and "embedding.word_embeddings.weight" not in last
    qkv_rows = (4 + 2 * 2) * layout.head_dim // 2
    assert first["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (qkv_rows, 32)
    assert first["decoder.layers.0.self_attention.linear_proj.weight"].shape == (32, 4 * layout.head_dim // 2)
    assert first["decoder.layers.0.mlp.linear_fc1.weight"].shape == (64, 32)
    assert last["output_layer.weight"].shape == (9, 32), "the last stage keeps the (tied) output layer"


def test_qkv_is_grouped_per_kv_head(tmp_path: Path) -> None:
    """Megatron's fused QKV holds, per KV group, that group's query heads, then its key, then its value."""
    directory = save_model(CONFIGS["qwen2"](), tmp_path)
    layout = Layout.from_hf_config(ckpt.hf_config(directory), 1, 1)
    read = ckpt.SafetensorsReader(directory)
    qkv = shard_from_hf(layout, read, 0, 0)["decoder.layers.0.self_attention.linear_qkv.weight"]
    d, attn = layout.head_dim, "model.layers.0.self_attn."
    q, k, v = (read(f"{attn}{x}_proj.weight") for x in "qkv")
    group1 = qkv[4 * d:]
    assert torch.equal(group1[:2 * d], q[2 * d:]) and torch.equal(group1[2 * d:3 * d], k[d:])
    assert torch.equal(group1[3 * d:], v[d:])


@pytest.mark.slow  # tp x pp = 4 conversion processes import Megatron-core (~20 s)
def test_checkpoint_files_and_hook_round_trip(tmp_path: Path) -> None:
    """HF -> Megatron checkpoint (built and saved by megatron-core at tp=2, pp=2) -> HF through the
    `convert_checkpoint` hook: a `release` checkpoint in Megatron-LM's layout and `torch_dist` format, and
    transformers loads the result bit-identical to the original, with its tokenizer. Qwen3 (q/k norms, a head
    size other than hidden / heads); the backend's save test covers Qwen2, its pp=2 test tied Llama."""
    hf_dir = save_model(CONFIGS["qwen3"](), tmp_path / "qwen3")
    backend = MegatronBackend(MegatronBackend.Options(tp=2, pp=2))
    native = backend.convert_checkpoint(source=hf_dir, out=tmp_path / "native", to="native")
    assert (native / ckpt.TRACKER).read_text() == "release"
    assert (native / "release" / "metadata.json").is_file() and list((native / "release").glob("*.distcp"))
    common = torch.load(native / "release" / "common.pt", weights_only=False)
    assert common["checkpoint_version"] == 3.0 and common["args"].num_layers == 4
    out = backend.convert_checkpoint(source=native, out=tmp_path / "hf", to="hf")
    original = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert sorted(loaded) == sorted(original)
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    tokens = [AutoTokenizer.from_pretrained(d)("1+2=").input_ids for d in (out, hf_dir)]
    assert tokens[0] == tokens[1]
    with pytest.raises(ConfigError, match="use 'native' or 'hf'"):
        backend.convert_checkpoint(source=native, out=tmp_path / "x", to="gguf")
    with pytest.raises(ConfigError, match="not a Megatron checkpoint"):
        backend.convert_checkpoint(source=hf_dir, out=tmp_path / "y", to="hf")


@pytest.mark.parametrize("tp,pp,message", [(3, 1, r"backend.tp=3 must divide the model's num_attention_heads \(4\)"),
                                           (4, 1, r"backend.tp=4 must divide the model's num_key_value_heads \(2\)"),
                                           (1, 3, r"backend.pp=3 must divide the model's num_hidden_layers \(4\)")])
def test_layouts_that_do_not_fit(tp: int, pp: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Layout.from_hf_config(CONFIGS["qwen2"](), tp, pp)


def test_unsupported_models_are_named() -> None:
    from transformers import GPT2Config
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported; supported: qwen2, qwen3, llama"):
        Layout.from_hf_config(GPT2Config(), 1, 1)
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        Layout.from_hf_config(Qwen2Config(**COMMON, hidden_act="gelu"), 1, 1)


def test_rope_settings() -> None:
    assert rope_settings(Qwen2Config(**COMMON, rope_theta=1e6)) == (1e6, None)
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 5e5}
    long_context = {**COMMON, "max_position_embeddings": 131072}
    assert rope_settings(LlamaConfig(**long_context, rope_parameters=llama3)) == (5e5, 32.0)
    with pytest.raises(ConfigError, match="rope scaling"):
        rope_settings(Qwen2Config(**COMMON, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}))


def test_pack_left_aligns_rows() -> None:
    """Each row is prompt (no left padding) + response; `logit_index` points at the position before each
    response token, and the length rounds up to the sequence-parallel multiple."""
    batch = make_batch(groups=2, n=3, prompt_len=5, response_len=4)
    inputs = pack(batch, multiple=4)
    assert inputs.tokens.shape[1] % 4 == 0 and inputs.attention_mask.shape[-1] == inputs.tokens.shape[1]
    for i in range(len(batch)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i] == 1]
        p = len(prompt)
        assert torch.equal(inputs.tokens[i, :p], prompt)
        assert torch.equal(inputs.tokens[i, p:p + 4], batch.response_ids[i])
        assert torch.equal(inputs.tokens[i, inputs.logit_index[i] + 1], batch.response_ids[i])
    assert inputs.attention_mask[0, 0, 0, 1] and not inputs.attention_mask[0, 0, 1, 0]
