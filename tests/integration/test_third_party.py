"""A third-party plugin package, pip-installed, is listed, selected from the CLI, configured and trained."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rlcore_cli import RLCORE, rlcore

from rlcore.metrics import MetricsLog

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rlcore-plugin-example"


@pytest.fixture(scope="module")
def example_env(tmp_path_factory):
    """The example package pip-installed into its own directory, visible through PYTHONPATH."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(EXAMPLE)], check=True, capture_output=True)
    return {**os.environ, "PYTHONPATH": str(site)}


def test_listed_with_its_distribution(example_env):
    rows = [line.split()[:5] for line in rlcore("plugins", env=example_env).stdout.splitlines()]
    assert ["task", "echo", "rlcore-plugin-example", "0.1.0", "ok"] in rows
    assert ["algo", "cispo", "rlcore-plugin-example", "0.1.0", "ok"] in rows


def test_selected_configured_and_trained(example_env, tmp_path):
    run_dir = tmp_path / "echo"
    rlcore("run", "--task", "echo", "--set", "task.length=3", "--steps", 3, "--run-dir", run_dir,
           "--set", "trainer.prompts_per_step=4", "--set", "sampling.n=4", env=example_env)
    assert "length: 3" in (run_dir / "config.yaml").read_text()
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    assert len(rows) == 3 and 0.0 <= rows[0]["reward/mean"] <= 1.0 and "score/exact" in rows[0]


def test_its_option_errors_are_clear(example_env):
    proc = subprocess.run([*RLCORE, "run", "--task", "echo", "--set", "task.length=999", "--dry-run"],
                          capture_output=True, text=True, env=example_env)
    assert proc.returncode == 2 and "length" in proc.stderr and "Traceback" not in proc.stderr


def test_its_own_tests_pass(example_env):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          capture_output=True, text=True, env=example_env, cwd=EXAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout


@pytest.mark.slow
def test_its_algorithm_learns_the_default_task(example_env, tmp_path):
    """cispo, written only against rlcore.toolkit, raises the reward of the embedded default run as the
    built-in algorithms do (tests/integration/test_algorithms_learn.py)."""
    run_dir = tmp_path / "cispo"
    rlcore("run", "--algo", "cispo", "--run-dir", run_dir, "--steps", 150, "--set", "trainer.save_every=0",
           env=example_env)
    rewards = [r["reward/mean"] for r in MetricsLog.read(run_dir / "metrics.jsonl")]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    print(f"cispo: reward {first:.3f} -> {last:.3f}")
    assert last >= 0.4 and last >= 3 * first, f"cispo did not learn: {first:.3f} -> {last:.3f}"
