"""Copying weights into a live model, including a tied-embedding model saved without its `lm_head`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlcore.errors import RLCoreError
from rlcore_backends.common.weights import copy_weights, read_safetensors


def tied_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=17, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


def test_tied_checkpoint_round_trip(tmp_path: Path) -> None:
    source, target = tied_model(0), tied_model(1)
    source.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path)
    assert "lm_head.weight" not in tensors, "save_pretrained drops the tied alias"
    copy_weights(target, tensors.items())
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name
    assert target.lm_head.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()


def test_missing_parameters_are_named(tmp_path: Path) -> None:
    source, target = tied_model(0), tied_model(1)
    partial = [(n, t) for n, t in source.state_dict().items() if "layers.0.mlp" not in n]
    with pytest.raises(RLCoreError, match="missing 3 parameters.*mlp"):
        copy_weights(target, partial)
    copy_weights(target, [(n, t.to(torch.bfloat16)) for n, t in source.state_dict().items()])
    torch.testing.assert_close(target.lm_head.weight, source.lm_head.weight, atol=1e-2, rtol=1e-2)
