"""A tiny random Llama written as a llama.cpp GGUF file, as the real SmolLM2 GGUF is laid out: architecture
`llama`, Q4_1 attention and MLP matrices, a Q8_0 embedding, float32 norms, Q/K rows permuted for llama.cpp's
RoPE, a byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) and a ChatML chat template in the metadata.

Built in well under a second with the `gguf` package, so `--model FILE.gguf` is tested without shipping a
pretrained model (the real SmolLM2 is what `benchmarks/smollm2_check.py` runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Pad, BOS and EOS, ids 0, 1, 2."""
MERGES = ["W h", "a t", "i s", "Ġ is"]
"""A few BPE merges (their results are in the vocabulary), so the tokenizer really merges."""
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADS, KV_HEADS = 4, 2
ROPE_THETA = 10000.0


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: byte b as one printable character (its own if printable, else 256 + n)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's Q/K rows from Hugging Face's rotate-half RoPE layout to llama.cpp's pairwise one."""
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def build_tiny_gguf(path: Path, seed: int = 0) -> torch.nn.Module:
    """Write a seeded random 2-layer Llama (hidden 64, GQA 4/2 heads) to `path`; return the float model it
    was quantised from, to compare the de-quantised weights against."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=ROPE_THETA, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(config.hidden_size // HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    normal = len(tokens) - len(SPECIALS)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * normal)
    writer.add_token_merges(MERGES)
    writer.add_pad_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)

    quant = gguf.GGMLQuantizationType

    def add(name: str, array: np.ndarray, kind: gguf.GGMLQuantizationType = quant.F32) -> None:
        if kind == quant.F32:
            writer.add_tensor(name, array.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)

    add("token_embd.weight", state["model.embed_tokens.weight"], quant.Q8_0)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[layer + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", llama_cpp_permute(state[layer + "self_attn.q_proj.weight"], HEADS), quant.Q4_1)
        add(f"blk.{i}.attn_k.weight", llama_cpp_permute(state[layer + "self_attn.k_proj.weight"], KV_HEADS), quant.Q4_1)
        add(f"blk.{i}.attn_v.weight", state[layer + "self_attn.v_proj.weight"], quant.Q4_1)
        add(f"blk.{i}.attn_output.weight", state[layer + "self_attn.o_proj.weight"], quant.Q4_1)
        add(f"blk.{i}.ffn_norm.weight", state[layer + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", state[layer + "mlp.gate_proj.weight"], quant.Q4_1)
        add(f"blk.{i}.ffn_up.weight", state[layer + "mlp.up_proj.weight"], quant.Q4_1)
        add(f"blk.{i}.ffn_down.weight", state[layer + "mlp.down_proj.weight"], quant.Q4_1)
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"], quant.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
