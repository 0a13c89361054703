"""A run that cannot learn stops with one line: non-finite rewards, a reward function that always raises,
prompts longer than the model's context; one that learns from another policy than it scores is warned."""

import json

import pytest
from click.testing import CliRunner

from rlcore.cli import main
from rlcore.metrics import MetricsLog

SMALL = ["--set", "trainer.prompts_per_step=2", "--set", "sampling.n=2", "--set", "trainer.save_every=0"]

TASKS = """
from rlcore_tasks.arithmetic import Arithmetic


class InfReward(Arithmetic):
    def reward(self, text, prompt):
        return float("inf") if prompt.id.endswith(("1", "3", "5", "7", "9")) else 0.0


class Raising(Arithmetic):
    def reward(self, text, prompt):
        raise KeyError("the reward's lookup table has no such answer")
"""


def run(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


@pytest.fixture
def bad_tasks(install_fake):
    install_fake(TASKS, {"rlcore.task": {"inf_reward": "{mod}:InfReward", "raising": "{mod}:Raising"}})


def test_non_finite_rewards_stop_the_run_naming_the_task(tmp_path, bad_tasks):
    r = run("--task", "inf_reward", "--run-dir", tmp_path / "r", "--steps", 5, *SMALL,
            "--set", "trainer.prompts_per_step=8")
    assert r.exit_code == 2, r.output
    assert "Error: step 1: task 'inf_reward' returned" in r.output and "non-finite rewards" in r.output
    assert "(first: inf for prompt 'train-" in r.output and "fix the task's reward function" in r.output
    assert not (tmp_path / "r" / "metrics.jsonl").exists() or not MetricsLog.read(tmp_path / "r" / "metrics.jsonl")


def test_a_reward_that_always_raises_stops_after_the_set_number_of_steps(tmp_path, bad_tasks):
    r = run("--task", "raising", "--run-dir", tmp_path / "r", "--steps", 10, *SMALL,
            "--set", "trainer.max_reward_error_steps=3")
    assert r.exit_code == 2, r.output
    assert ("Error: step 3: task 'raising': its reward function raised on every sample for 3 steps in a row"
            in r.output) and "trainer.max_reward_error_steps" in r.output
    rows = MetricsLog.read(tmp_path / "r" / "metrics.jsonl")
    assert [row["score/reward_error"] for row in rows] == [1.0, 1.0]  # steps 1 and 2 ran; step 3 stopped it


def test_raising_rewards_may_be_tolerated(tmp_path, bad_tasks):
    r = run("--task", "raising", "--run-dir", tmp_path / "r", "--steps", 2, *SMALL,
            "--set", "trainer.max_reward_error_steps=0")
    assert r.exit_code == 0, r.output


def test_max_new_tokens_beyond_the_context_is_an_error_before_training(tmp_path):
    """The embedded model has 4096 positions."""
    r = run("--run-dir", tmp_path / "r", "--steps", 1, *SMALL, "--set", "sampling.max_new_tokens=9000")
    assert r.exit_code == 2, r.output
    assert ("sampling.max_new_tokens=9000 leaves no room for a prompt in the model's context of 4096 positions "
            "(max_position_embeddings" in r.output)
    assert not (tmp_path / "r").exists() or not (tmp_path / "r" / "metrics.jsonl").exists()


def _gsm8k_file(path, long_question_chars):
    rows = [{"question": "1+1=", "answer": "#### 2"}, {"question": "2+2=", "answer": "#### 4"},
            {"question": "3" * long_question_chars, "answer": "#### 3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_prompt_longer_than_the_context_is_an_error_before_training(tmp_path):
    data = _gsm8k_file(tmp_path / "train.jsonl", 8100)
    args = ["--task", "gsm8k", "--set", f"task.train_path={data}", "--set", f"task.test_path={data}",
            "--steps", 1, *SMALL]
    r = run("--run-dir", tmp_path / "r", *args)
    assert r.exit_code == 2, r.output
    assert ("train split: prompt 'train-2' has 81" in r.output and "tokens, and with sampling.max_new_tokens=4 it "
            "exceeds the model's context of 4096 positions" in r.output)
    assert "trainer.filter_overlong_prompts" in r.output
    r = run("--run-dir", tmp_path / "r2", *args, "--set", "trainer.filter_overlong_prompts=true")
    assert r.exit_code == 0, r.output
    assert [row["step"] for row in MetricsLog.read(tmp_path / "r2" / "metrics.jsonl")] == [1]


def test_a_generated_dataset_is_checked_as_prompts_are_drawn(tmp_path):
    """Arithmetic generates its 100,000 problems on access, so each is checked when the stream draws it:
    two 31-digit operands make ~63-token prompts, which do not fit 4096 positions with 4050 new tokens."""
    r = run("--run-dir", tmp_path / "r", "--steps", 2, *SMALL, "--set", f"task.max_operand={10**30}",
            "--set", "sampling.max_new_tokens=4050")
    assert r.exit_code == 2, r.output
    assert "Error: step 1, train split: prompt 'train-" in r.output and "exceeds the model's context" in r.output


def test_a_rollout_in_another_precision_without_importance_correction_is_warned_about(tmp_path, caplog):
    """The rollout samples from another policy than the trainer scores, measured, and the loss could correct
    for it but was told not to: one warning naming the gap and the fix. By default (`tis_cap: auto`) such a
    run corrects for it: config.yaml says 2.0 and the update reports its importance weights."""
    def warned(*args):
        caplog.clear()
        assert run("--steps", 1, *SMALL, *args).exit_code == 0
        return "differ from the trainer's by" in caplog.text and "set algo.tis_cap=2" in caplog.text

    bf16 = ["--set", "rollout.dtype=bfloat16", "--set", "backend.dtype=float32"]
    assert not warned("--run-dir", tmp_path / "same")  # float32 on both sides: ~1e-7 nats
    assert warned("--run-dir", tmp_path / "off", *bf16, "--set", "algo.tis_cap=null")
    assert not warned("--run-dir", tmp_path / "tis", *bf16, "--set", "algo.tis_cap=2")
    assert not warned("--run-dir", tmp_path / "auto", *bf16)
    assert "tis_cap: 2.0" in (tmp_path / "auto" / "config.yaml").read_text()
    weights = [row["tis_weight_mean"] for row in MetricsLog.read(tmp_path / "auto" / "metrics.jsonl")]
    assert weights and 0.5 < weights[0] < 1.5 and weights[0] != 1.0
    assert "tis_weight_mean" not in MetricsLog.read(tmp_path / "same" / "metrics.jsonl")[0]
