"""The hook contract is enforced where the loop receives each result: a malformed hook output stops a real
run with one line naming the plugin and the hook, and NaN rewards are blamed on the task, not the loss."""

import re

import pytest
from click.testing import CliRunner

from rlcore.cli import main

SMALL = ["--steps", "2", "--set", "trainer.prompts_per_step=2", "--set", "sampling.n=2",
         "--set", "trainer.save_every=0"]

PLUGINS = """
from rlcore import hookimpl
from rlcore_algorithms.grpo import GRPO
from rlcore_tasks.arithmetic import Arithmetic


class FlatAdvantage(GRPO):
    @hookimpl
    def advantage(self, batch):
        return batch.rewards - batch.rewards.mean()


class NaNReward(Arithmetic):
    def reward(self, text, prompt):
        return float("nan")
"""


@pytest.fixture(autouse=True)
def broken_plugins(install_fake):
    install_fake(PLUGINS, {"rlcore.algo": {"flat_adv": "{mod}:FlatAdvantage"},
                           "rlcore.task": {"nan_reward": "{mod}:NaNReward"}})


def run(*args):
    return CliRunner().invoke(main, ["run", *map(str, args), *SMALL])


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("Error:")]


def test_an_advantage_of_shape_b_stops_the_run_naming_the_plugin_and_hook(tmp_path):
    r = run("--algo", "flat_adv", "--run-dir", tmp_path / "r")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    [line] = error_lines(r.output)
    assert re.fullmatch(r"Error: algo plugin 'flat_adv', hook 'advantage': expected advantages \[B, R\]: a float "
                        r"tensor of shape \[4, \d+\]; got a torch.float32 tensor of shape \[4\]", line), line


def test_nan_rewards_are_a_reward_problem_naming_the_task_not_a_non_finite_loss(tmp_path):
    r = run("--task", "nan_reward", "--run-dir", tmp_path / "r")
    assert r.exit_code == 2, r.output
    [line] = error_lines(r.output)
    assert line.startswith("Error: step 1: task 'nan_reward' returned 4 non-finite rewards of 4 (first: nan"), line
    assert "fix the task's reward function" in line and "loss" not in line
