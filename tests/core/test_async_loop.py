"""Asynchronous RL through `rlcore run` (`trainer.max_staleness`): each step trains on samples from exactly the
policy version the bound allows, every sample says which, runs repeat exactly, a resume equals the run it
continues, evaluation sees the current weights, DAPO refills from the stream, and a rollout-thread error is
one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from rlcore.cli import main
from rlcore.metrics import MetricsLog

SMALL = ["--set", "trainer.prompts_per_step=4", "--set", "sampling.n=4"]
VOLATILE = ("timing/", "tokens_per_s", "update/seconds", "sync/seconds", "async/trainer_wait_s",
            "async/rollout_wait_s")


def run(*args: object) -> str:
    result = CliRunner().invoke(main, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def stable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(v_ in k for v_ in VOLATILE)}
            for r in MetricsLog.read(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("k", [1, 2])
def test_step_j_trains_on_samples_of_version_j_minus_k(tmp_path, k):
    run_dir = tmp_path / "run"
    run("run", "--run-dir", run_dir, "--steps", 6, *SMALL, "--set", f"trainer.max_staleness={k}",
        "--set", "trainer.generations_every=1", "--set", "trainer.save_every=0")
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    assert [r["async/staleness_max"] for r in rows] == [float(min(j, k)) for j in range(6)]
    assert all(r["async/trainer_wait_s"] >= 0 and r["async/rollout_wait_s"] >= 0 for r in rows)
    assert all("mismatch/iw_mean" in r for r in rows)  # the behaviour policy's importance weights, every step
    tables = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert {(t["step"], t["policy_version"]) for t in tables} == {(j + 1, max(0, j - k)) for j in range(6)}


def test_synchronous_rows_carry_no_async_metrics(tmp_path):
    run("run", "--run-dir", tmp_path / "run", "--steps", 2, *SMALL, "--set", "trainer.save_every=0")
    assert not any(key.startswith("async/") for r in MetricsLog.read(tmp_path / "run" / "metrics.jsonl") for key in r)


def test_an_asynchronous_run_repeats_exactly_and_learns_something(tmp_path):
    args = ["--steps", 8, *SMALL, "--set", "trainer.max_staleness=1", "--set", "trainer.save_every=0"]
    run("run", "--run-dir", tmp_path / "a", *args)
    run("run", "--run-dir", tmp_path / "b", *args)
    a = stable(tmp_path / "a")
    assert a == stable(tmp_path / "b")
    assert len({r["reward/mean"] for r in a}) > 1 and any(r["grad_norm"] > 0 for r in a)


def test_resuming_a_mid_run_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """The checkpoint at step 4 holds the batches sampled ahead (steps 5 and 6 for k=2) and the prompt stream
    after them; the resumed run continues the same schedule."""
    full = tmp_path / "full"
    run("run", "--run-dir", full, "--steps", 8, *SMALL, "--set", "trainer.max_staleness=2",
        "--set", "trainer.save_every=4")
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000008")
    (resumed / "summary.json").unlink()
    assert (resumed / "checkpoints" / "step_000004" / "core" / "queued_batches.pt").is_file()
    out = run("run", "--resume", resumed)
    assert "step 4" in out
    assert stable(resumed) == stable(full)


def test_extending_a_finished_run_samples_its_first_new_batches_with_its_last_weights(tmp_path):
    """No version older than the last one is kept, so the k steps after the old end are fresher than k."""
    run_dir = tmp_path / "run"
    run("run", "--run-dir", run_dir, "--steps", 3, *SMALL, "--set", "trainer.max_staleness=2")
    run("run", "--resume", run_dir, "--steps", 7)
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 2.0]


def test_evaluation_sees_the_current_weights_not_the_rollouts_stale_ones(tmp_path):
    """The run's final evaluation (greedy) equals `rlcore eval` of the final checkpoint."""
    run_dir = tmp_path / "run"
    run("run", "--run-dir", run_dir, "--steps", 6, *SMALL, "--set", "trainer.max_staleness=2",
        "--set", "backend.lr=0.01", "--set", "trainer.eval_every=6", "--set", "trainer.eval_limit=64")
    final = MetricsLog.read(run_dir / "metrics.jsonl")[-1]
    run("eval", "--run-dir", run_dir, "--limit", 64, "--out", tmp_path / "eval.json")
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert final["eval/reward"] == pytest.approx(evaluated["reward_mean"], abs=1e-9)
    assert final["eval/pass@1"] == pytest.approx(evaluated["pass_at"]["pass@1"], abs=1e-9)


def test_dynamic_sampling_refills_from_the_stream_in_the_rollout_thread(tmp_path):
    run_dir = tmp_path / "run"
    run("run", "--run-dir", run_dir, "--algo", "dapo", "--steps", 4, *SMALL, "--set", "trainer.max_staleness=1",
        "--set", "trainer.save_every=0")
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    assert sum(r["filter/groups_dropped"] for r in rows) > 0  # the tiny model's groups are mostly all-zero
    assert all(r["filter/extra_rounds"] >= 1 for r in rows if r["filter/groups_dropped"] > 0)
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0, 1.0]


def test_an_error_in_the_rollout_thread_is_one_line(tmp_path, install_fake):
    install_fake("from rlcore_tasks.arithmetic import Arithmetic\n\n\nclass NaNReward(Arithmetic):\n"
                 "    def reward(self, text, prompt):\n        return float('nan')\n",
                 {"rlcore.task": {"nan_reward": "{mod}:NaNReward"}})
    result = CliRunner().invoke(main, ["run", "--run-dir", str(tmp_path / "r"), "--task", "nan_reward", "--steps", "3",
                                       *SMALL, "--set", "trainer.max_staleness=1"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "task 'nan_reward' returned 16 non-finite rewards" in errors[0], result.output
    assert "Traceback" not in result.output


def test_the_staleness_of_a_run_cannot_change_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    run("run", "--run-dir", run_dir, "--steps", 2, *SMALL, "--set", "trainer.max_staleness=1")
    result = CliRunner().invoke(main, ["run", "--resume", str(run_dir), "--steps", "4",
                                       "--set", "trainer.max_staleness=0"])
    assert result.exit_code == 2 and "trainer.max_staleness 1 -> 0 would change what this run is" in result.output


def test_staleness_without_importance_correction_is_warned_about(tmp_path, caplog):
    args = ["run", "--steps", 1, *SMALL, "--set", "trainer.max_staleness=1", "--set", "trainer.save_every=0"]
    run(*args, "--run-dir", tmp_path / "a")
    assert "without algo.tis_cap" in caplog.text
    caplog.clear()
    run(*args, "--run-dir", tmp_path / "b", "--set", "algo.tis_cap=2")
    assert "without algo.tis_cap" not in caplog.text and "Error" not in caplog.text
