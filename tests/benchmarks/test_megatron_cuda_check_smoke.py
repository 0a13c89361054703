"""`benchmarks/megatron_cuda_check.py` on this CPU: it refuses cleanly without CUDA, builds its model and batches,
and (with the megatron tests' CPU shims standing in for CUDA, test-only) its whole comparison runs end to end and
reports agreement, so the GPU run it is written for has only CUDA left to prove."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "megatron_cuda_check.py"
SMALL = ["--steps", "2", "--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "97", "--groups", "2",
         "--n", "3", "--prompt-len", "6", "--response-len", "7"]

pytestmark = pytest.mark.slow  # the last test starts a Megatron worker (~20 s)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_without_cuda_it_refuses_with_one_line_and_status_2() -> None:
    proc = run(*SMALL)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU: torch.cuda.is_available() is False" in proc.stderr and "Traceback" not in proc.stderr
    assert "model: random Qwen2, 2 layers, hidden 64" in proc.stdout, "the model and batches are built first"


def test_check_setup_builds_the_model_and_batches() -> None:
    proc = run(*SMALL, "--check-setup")
    assert proc.returncode == 0, proc.stderr
    assert "2 batches of 6 samples x (6 + 7) tokens" in proc.stdout


def test_the_comparison_runs_end_to_end_with_cpu_stand_ins(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    sys.path.insert(0, str(REPO / "tests" / "backends"))
    import megatron_cuda_check as check
    from test_megatron_backend import megatron_on_cpu

    from rlcore.testing import make_context
    from rlcore_backends.update.megatron.backend import MegatronBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "CPU stand-in")
    monkeypatch.setattr(check, "context", lambda run_dir, model_dir, seed: make_context(run_dir, model_dir, seed=seed))
    monkeypatch.setattr(MegatronBackend, "worker_init", staticmethod(megatron_on_cpu))
    monkeypatch.setattr(sys, "argv", ["megatron_cuda_check.py", *SMALL])
    assert check.main() == 0
    out = capsys.readouterr().out
    assert "AGREE" in out and "update tokens/s" in out and "checkpoint save + load: max |diff| 0.000e+00" in out
