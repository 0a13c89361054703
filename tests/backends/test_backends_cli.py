"""The fsdp and lora backends through the real `rlcore` command: train, resume, export (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

SMALL = ["--set", "trainer.prompts_per_step=4", "--set", "sampling.n=4", "--seed", "3"]
VOLATILE = ("timing/", "tokens_per_s", "seconds")


def rlcore(*args: object, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = launcher or [sys.executable, "-m", "rlcore"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if launcher else None
    proc = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(command)} {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "terminate called" not in proc.stderr, proc.stderr  # a rank that aborted in teardown
    return proc


def metrics(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not any(s in k for s in VOLATILE)} for row in rows]


@pytest.mark.slow
def test_fsdp_run_resumes_exactly_and_exports(tmp_path: Path) -> None:
    args = ["--backend", "fsdp", "--set", "backend.lr=2e-3", "--set", "trainer.save_every=2", *SMALL]
    full = tmp_path / "full"
    rlcore("run", "--run-dir", full, "--steps", 3, *args)
    rows = metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(abs(r["loss"]) < 10 for r in rows)
    assert len(list((full / "checkpoints" / "step_000003" / "backend" / "dcp").glob("*.distcp"))) == 2

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000003")
    rlcore("run", "--resume", resumed)
    assert metrics(resumed) == rows, "steps 3 after resuming from step 2 equal the uninterrupted run's"
    rlcore("run", "--resume", resumed, "--steps", 4, "--set", "backend.lr=0.5")
    assert [r["lr"] for r in metrics(resumed)] == [2e-3] * 3 + [0.5], "every rank trains with the new lr"

    rlcore("export", full, "--out", tmp_path / "model")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(full / "model", dtype=torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(), start.state_dict().values()))


@pytest.mark.slow
def test_lora_run_and_merged_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rlcore("run", "--backend", "lora", "--run-dir", run_dir, "--steps", 3, "--set", "backend.lr=1e-2",
           "--set", "backend.rank=4", *SMALL)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]
    adapter = run_dir / "checkpoints" / "step_000003" / "backend" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    rlcore("export", run_dir, "--out", tmp_path / "model")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert not any("lora" in name for name in exported.state_dict())


@pytest.mark.slow
def test_fsdp_under_torchrun(tmp_path: Path, rlcore_tiny_model: Path) -> None:
    """torchrun starts 2 ranks: rank 0 runs the loop, rank 1 serves it and exits when the run ends."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rlcore"]
    run_dir = tmp_path / "run"
    rlcore("run", "--backend", "fsdp", "--model", rlcore_tiny_model, "--run-dir", run_dir, "--steps", 2,
           "--set", "backend.lr=2e-3", "--set", "sampling.max_new_tokens=4", *SMALL, launcher=torchrun)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert len(list((run_dir / "checkpoints" / "step_000002" / "backend" / "dcp").glob("*.distcp"))) == 2


@pytest.mark.slow
def test_lora_on_fsdp_under_torchrun_builds_the_embedded_model_once(tmp_path: Path) -> None:
    """Both ranks resolve the embedded tiny model in the same run directory: rank 0 builds it (atomically)
    and writes config.yaml, rank 1 waits for it; the adapters train on 2 FSDP ranks."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rlcore"]
    run_dir = tmp_path / "run"
    rlcore("run", "--backend", "lora", "--set", "backend.base=fsdp", "--set", "backend.rank=4", "--run-dir", run_dir,
           "--steps", 2, "--set", "backend.lr=1e-2", *SMALL, launcher=torchrun)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "model" / "config.json").is_file()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("model")) == ["model"]
    backend = run_dir / "checkpoints" / "step_000002" / "backend"
    assert (backend / "adapter" / "adapter_model.safetensors").is_file()
    assert len(list((backend / "dcp").glob("*.distcp"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "lora"])
def test_asynchronous_run_follows_the_staleness_schedule_and_resumes_exactly(tmp_path: Path, backend: str) -> None:
    """`trainer.max_staleness=1`: the backend's snapshots feed the rollout thread; a resume from the step-3
    checkpoint (which holds the batches sampled ahead) retrains steps 4-6 exactly."""
    full = tmp_path / "full"
    rlcore("run", "--run-dir", full, "--steps", 6, "--backend", backend, "--set", "trainer.max_staleness=1",
           "--set", "trainer.save_every=3", *SMALL)
    rows = metrics(full)
    assert [r["async/staleness_max"] for r in rows] == [0.0] + [1.0] * 5
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    (resumed / "summary.json").unlink()
    rlcore("run", "--resume", resumed)
    wait = ("async/trainer_wait_s", "async/rollout_wait_s")
    assert [{k: v for k, v in r.items() if k not in wait} for r in metrics(resumed)] == \
        [{k: v for k, v in r.items() if k not in wait} for r in rows]
