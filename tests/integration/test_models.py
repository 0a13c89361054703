"""`--model` with a GGUF file (a tiny llama.cpp-style one built by the test) and with a local directory."""

from pathlib import Path

import torch
from rlcore_cli import rlcore
from tiny_gguf import build_tiny_gguf

from rlcore.metrics import MetricsLog


def test_gguf_model_is_dequantised_into_the_run_and_trains(tmp_path: Path) -> None:
    """A Q4_1/Q8_0 GGUF with its own tokenizer and chat template is de-quantised into the run directory (the
    weights within the quantisation step of the float model it was written from, Q/K rows un-permuted),
    trains a step in the chat style, and its checkpoint loads back as a plain transformers Llama. ~10 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = tmp_path / "tiny.Q4_1.gguf"
    original = build_tiny_gguf(gguf_file)
    run_dir = tmp_path / "run"
    rlcore("run", "--model", gguf_file, "--run-dir", run_dir, "--steps", 1, "--set", "task.style=instruct",
           "--set", "sampling.max_new_tokens=8", "--set", "trainer.prompts_per_step=4", "--set", "sampling.n=2",
           "--set", "backend.lr=1e-3", "--set", "trainer.save_every=0")
    row = MetricsLog.read(run_dir / "metrics.jsonl")[0]
    assert row["step"] == 1 and 0.0 <= row["reward/mean"] <= 1.0, row

    model_dir = run_dir / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    dequantised = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    for name, weight in original.state_dict().items():
        # Q4_1 rounds each block of 32 to one of 16 levels spanning the block (at most the tensor's range)
        step = float(weight.max() - weight.min()) / 15
        assert float((dequantised[name] - weight).abs().max()) <= step / 2 * 1.01 + 1e-4, name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_ids_to_tokens(tokenizer("What is 3")["input_ids"])[:2] == ["Wh", "at"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    trained = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_000001" / "backend" / "model")
    assert trained.config.model_type == "llama" and trained.num_parameters() == original.num_parameters()


def test_local_model_directory(tmp_path, rlcore_tiny_model):
    run_dir = tmp_path / "local"
    rlcore("run", "--model", rlcore_tiny_model, "--run-dir", run_dir, "--steps", 1, "--set", "backend.lr=1e-3",
           "--set", "sampling.max_new_tokens=4", "--set", "trainer.prompts_per_step=2", "--set", "sampling.n=2")
    assert not (run_dir / "model").exists()  # used in place, not copied
    assert MetricsLog.read(run_dir / "metrics.jsonl")[0]["step"] == 1


def test_missing_model_is_a_clear_error(tmp_path):
    import subprocess

    from rlcore_cli import RLCORE

    proc = subprocess.run([*RLCORE, "run", "--model", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
