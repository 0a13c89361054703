"""End-to-end runs through the real `rlcore` command: artifacts, resuming after SIGKILL, learning."""

import json
import os
import signal
import subprocess
import time

import pytest
from rlcore_cli import RLCORE, rlcore

from rlcore.metrics import MetricsLog

VOLATILE = ("timing/", "tokens_per_s", "update/seconds", "sync/seconds", "async/trainer_wait_s", "async/rollout_wait_s")
SMALL = ["--set", "trainer.prompts_per_step=4", "--set", "sampling.n=4"]


def stable(rows):
    return [{k: v for k, v in r.items() if not any(v_ in k for v_ in VOLATILE)} for r in rows]


def test_run_writes_config_metrics_checkpoints_summary(tmp_path):
    run_dir = tmp_path / "run"
    proc = rlcore("run", "--run-dir", run_dir, "--steps", 3, *SMALL, "--set", "trainer.save_every=2")
    assert "reward" in proc.stdout and str(run_dir) in proc.stdout
    config = (run_dir / "config.yaml").read_text()
    assert "plugins:" in config and "algo: grpo" in config and config in proc.stdout  # printed and saved
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    required = {"step", "reward/mean", "reward/std", "loss", "entropy", "clip_frac", "approx_kl",
                "response_length/mean", "tokens_per_s", "timing/sample", "timing/update", "timing/step"}
    assert required <= set(rows[0]), required - set(rows[0])
    # hf samples with the trainer's own fp32 weights: its logprobs must match the trainer's on every step
    assert all(r["mismatch/abs_diff_max"] < 1e-4 and abs(r["mismatch/iw_mean"] - 1) < 1e-4 for r in rows)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["last_checkpoint"].endswith("step_000003")
    out = rlcore("report", run_dir)
    png = run_dir / "report.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG" and str(png) in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 2])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, staleness):
    """Synchronous, and asynchronous with k=2 (its checkpoints hold the batches sampled ahead)."""
    args = ["--steps", 10, *SMALL, "--set", "trainer.save_every=3", "--seed", 5,
            "--set", f"trainer.max_staleness={staleness}"]
    full = tmp_path / "full"
    rlcore("run", "--run-dir", full, *args)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*RLCORE, "run", "--run-dir", str(killed), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(MetricsLog.read(metrics)) >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "step_000006").is_dir()
    assert not (killed / "summary.json").exists()
    rlcore("run", "--resume", killed)
    want = stable(MetricsLog.read(full / "metrics.jsonl"))
    got = stable(MetricsLog.read(killed / "metrics.jsonl"))
    assert [r["step"] for r in got] == list(range(1, 11))
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """`rlcore run` with no options: last-10-step mean reward >= 0.5 and >= 2x the first 10 steps'."""
    run_dir = tmp_path / "default"
    start = time.time()
    proc = rlcore("run", "--run-dir", run_dir)
    elapsed = time.time() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    rewards = [r["reward/mean"] for r in MetricsLog.read(run_dir / "metrics.jsonl")]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    print(f"default run: reward {first:.3f} -> {last:.3f} in {elapsed:.0f} s")
    assert summary["reward_start"] == pytest.approx(first) and summary["reward_end"] == pytest.approx(last)
    assert last >= 0.5 and last >= 2 * first, proc.stdout[-2000:]
    assert "->" in proc.stdout and "next:" in proc.stdout
    assert elapsed < 600


@pytest.mark.slow
def test_default_run_learns_in_bfloat16_matched_with_float32_agreement(tmp_path):
    """The default run with rollout and trainer in `bfloat16_matched`: it learns as the float32 one does, and
    every step's rollout-vs-trainer logprob gap stays at float32's level (plain bfloat16's is ~1e-3 here)."""
    run_dir = tmp_path / "matched"
    rlcore("run", "--run-dir", run_dir, "--set", "backend.dtype=bfloat16_matched",
           "--set", "rollout.dtype=bfloat16_matched")
    assert "dtype: bfloat16_matched" in (run_dir / "config.yaml").read_text()
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= 0.5 and last >= 2 * first, (first, last)
    assert max(r["mismatch/abs_diff_mean"] for r in rows) < 1e-5
    assert max(r["mismatch/abs_diff_max"] for r in rows) < 1e-4


def test_validation_every_n_steps(tmp_path):
    run_dir = tmp_path / "val"
    rlcore("run", "--run-dir", run_dir, "--steps", 4, *SMALL, "--set", "trainer.eval_every=2",
           "--set", "trainer.eval_limit=8", "--set", "trainer.save_every=0", "--set", "trainer.log_mismatch=false")
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    assert ["eval/pass@1" in r for r in rows] == [False, True, False, True]
    assert not any(k.startswith("mismatch/") for r in rows for k in r)  # switched off
    assert all(0.0 <= r["eval/pass@1"] <= 1.0 for r in rows if "eval/pass@1" in r)


def test_trace_prints_every_hook_call(tmp_path):
    proc = rlcore("run", "--trace", "--run-dir", tmp_path / "t", "--steps", 1, *SMALL, "--set", "trainer.save_every=0")
    calls = [line for line in proc.stderr.splitlines() if line.startswith("[rlcore trace]")]
    for hook in ("setup", "dataset", "sample", "score", "advantage", "update", "policy_weights", "sync_weights"):
        assert any(f" {hook} [hook]" in line for line in calls), hook
    # on-policy, the mismatch comes from the update's own forward: no logprobs pass is paid for it
    assert not any(" logprobs [hook]" in line for line in calls)


def test_off_policy_updates_score_the_old_policy_once(tmp_path):
    run_dir = tmp_path / "t"
    proc = rlcore("run", "--trace", "--run-dir", run_dir, "--steps", 1, *SMALL, "--set", "trainer.save_every=0",
                  "--set", "trainer.mini_batches=2")
    calls = [line for line in proc.stderr.splitlines() if line.startswith("[rlcore trace]")]
    assert sum(" logprobs [hook]" in line for line in calls) == 1
    (row,) = MetricsLog.read(run_dir / "metrics.jsonl")
    assert row["mismatch/abs_diff_max"] < 1e-4 and {"mismatch/iw_std", "mismatch/iw_min"} <= set(row)
