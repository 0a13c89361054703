"""`--model` with real assets: SmolLM2-135M-Instruct (GGUF) from ../shared/data, and a local directory."""

from pathlib import Path

import pytest
from rlcore_cli import rlcore

from rlcore.metrics import MetricsLog

SMOLLM = Path(__file__).resolve().parents[3] / "shared" / "data" / "models" / "smollm2-135m-instruct-q4_1"
GGUF = SMOLLM / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists(), reason="needs ../shared/data (the SmolLM2 GGUF asset)")
def test_gguf_model_trains_and_answers(tmp_path):
    """The GGUF is de-quantised once into the run directory; greedy answers are right about half the time."""
    run_dir = tmp_path / "smollm"
    rlcore("run", "--model", GGUF, "--run-dir", run_dir, "--steps", 1, "--set", "task.style=instruct",
           "--set", "sampling.max_new_tokens=16", "--set", "trainer.prompts_per_step=8", "--set", "sampling.n=2",
           "--set", "sampling.temperature=0", "--set", "backend.lr=1e-5", "--set", "trainer.save_every=0")
    row = MetricsLog.read(run_dir / "metrics.jsonl")[0]
    assert row["reward/mean"] >= 0.25, row
    assert (run_dir / "model" / "model.safetensors").exists() and (run_dir / "model" / "tokenizer.json").exists()
    # the saved checkpoint loads back as a plain transformers model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_000001" / "backend" / "model")
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000


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
