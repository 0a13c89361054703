"""The echo task's hooks called alone, on batches built by rlcore's test helpers."""

from __future__ import annotations

import pytest

from rlcore.config import build_options
from rlcore.errors import ConfigError, RLCoreError
from rlcore.models import TINY_CHARS
from rlcore.testing import check_task, make_batch
from rlcore_plugin_example.task import EchoTask


def echo(**options: object) -> EchoTask:
    return EchoTask(build_options(EchoTask.Options, options, "task"))


def test_prompts_are_seeded_digit_strings_in_the_tiny_alphabet():
    train = echo(length=5, seed=1).dataset("train")
    assert train == echo(length=5, seed=1).dataset("train") != echo(length=5, seed=2).dataset("train")
    for p in train[:50]:
        content = p.messages[0]["content"]
        assert content == f"{p.answer}=" and len(p.answer) == 5 and p.answer.isdigit()
        assert set(content) <= set(TINY_CHARS)
    assert len(echo().dataset("test")) == 100
    with pytest.raises(RLCoreError, match="train, test"):
        echo().dataset("dev")


def test_score_is_the_fraction_of_digits_copied_in_place():
    prompts = echo(length=4).dataset("test")[:1] * 6
    target = prompts[0].answer
    batch = make_batch(groups=1, n=6)
    batch.prompts = prompts
    batch.texts = [target, f" {target}\n", target[:2], target + "00", "", target[:3] + "x"]
    scores = echo().score(batch)
    assert scores.rewards.tolist() == [1.0, 1.0, 0.5, pytest.approx(4 / 6), 0.0, 0.75]
    assert [i["exact"] for i in scores.info] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_a_broken_answer_scores_zero_and_is_counted():
    batch = make_batch(groups=1, n=2)
    batch.prompts[0].answer = None
    batch.texts = ["1", "1"]
    scores = echo().score(batch)
    assert scores.rewards.tolist() == [0.0, 1.0]
    assert [i["reward_error"] for i in scores.info] == [1.0, 0.0]


def test_bad_length_names_the_option():
    with pytest.raises(ConfigError, match="length"):
        echo(length=0)


def test_contract():
    check_task(EchoTask(EchoTask.Options()), responses=["4821", "", "48", "junk"])
