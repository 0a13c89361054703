"""RL teaches a model to use a tool: the examples/tool-use recipe, shortened (one seed).

Two warm starts give the embedded tool model the skill (write a hermes calculator call, copy its answer) and
the habit of answering from its head (it calls on a few % of problems); GRPO with the calculator offered
must then raise both the tool-call rate and the reward far above what any answer without the tool reaches:
six-digit products of random 3-digit numbers, whose best blind guess is right with the probability computed
below, and which a 0.5M-parameter model does not compute (README: the no-tool control stays at 0).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from rlcore.cli import main
from rlcore.metrics import MetricsLog

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "tool-use" / "cpu.yaml"


def invoke(*args: object) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def best_guess_accuracy(low: int = 317, high: int = 999) -> float:
    """The chance that the single most frequent product is the answer: the best a policy without the tool does
    when it cannot multiply (and it sees nothing else that predicts the product)."""
    products = Counter(a * b for a in range(low, high + 1) for b in range(low, high + 1))
    return max(products.values()) / (high - low + 1) ** 2


@pytest.mark.slow
def test_rl_raises_tool_calls_and_reward_past_the_no_tool_ceiling(tmp_path: Path) -> None:
    """~2-4 minutes on 2 cores: warm starts of 100 and 60 steps, then 12 RL steps."""
    invoke("warmstart", "--config", RECIPE, "--out", tmp_path / "ws1", "--steps", 100, "--lr", 3e-3,
           "--set", "task.demo_tool_rate=1.0")
    invoke("warmstart", "--config", RECIPE, "--model", tmp_path / "ws1" / "model", "--out", tmp_path / "ws2",
           "--steps", 60, "--lr", 1e-3)
    invoke("run", "--config", RECIPE, "--model", tmp_path / "ws2" / "model", "--steps", 12,
           "--run-dir", tmp_path / "rl")
    rows = MetricsLog.read(tmp_path / "rl" / "metrics.jsonl")
    calls = [r["rollout/tool_calls"] for r in rows]
    rewards = [r["reward/mean"] for r in rows]
    assert calls[0] < 0.15, f"the warm-started model (step 1 samples before any update) rarely calls: {calls}"
    assert sum(calls[-4:]) / 4 > 0.8, f"RL makes it call the calculator: {calls}"
    # the ceiling without the tool is 6.9e-5; one seed's last steps vary widely (step 10: 0.00-0.64 over 3 seeds)
    assert rewards[0] < 0.1 and sum(rewards[-4:]) / 4 > 0.3, f"and be right: {rewards}"
    assert min(rewards[-4:]) > 100 * best_guess_accuracy(), "far past any answer without the tool"
    assert all(r["rollout/tool_errors"] <= r["rollout/tool_calls"] for r in rows)
