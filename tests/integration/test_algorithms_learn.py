"""Every algorithm, run end to end through `rlcore run` on the arithmetic task, improves the reward."""

import json

import pytest

from rlcore import plugins
from rlcore.metrics import MetricsLog

from rlcore_cli import rlcore


@pytest.mark.slow
@pytest.mark.parametrize("algo", plugins.available("algo"))
def test_algorithm_improves_reward_on_arithmetic(tmp_path, algo):
    run_dir = tmp_path / algo
    rlcore("run", "--algo", algo, "--run-dir", run_dir, "--steps", 150, "--set", "trainer.save_every=0")
    rewards = [r["reward/mean"] for r in MetricsLog.read(run_dir / "metrics.jsonl")]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    print(f"{algo}: reward {first:.3f} -> {last:.3f}")
    assert last >= 0.4 and last >= 3 * first, f"{algo} did not learn: {first:.3f} -> {last:.3f}"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 150
