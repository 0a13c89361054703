"""The colors task: seeded lazy problems whose answer is only in the image, the first-letter reward, its checks."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config

from rlcore import Prompt
from rlcore.config import build_options
from rlcore.errors import ConfigError, DataError
from rlcore.models import EMBEDDED_VL, read_config
from rlcore.testing import check_task
from rlcore_tasks.colors import PALETTE, Colors


def task(**options: object) -> Colors:
    return Colors(build_options(Colors.Options, options, "task"))


def test_problems_are_seeded_lazy_and_differ_only_in_the_image() -> None:
    train = task().dataset("train")
    assert len(train) == 100000 and len(task().dataset("test")) == 256
    a, b = train[7], task().dataset("train")[7]
    assert a.answer == b.answer and a.images[0].tobytes() == b.images[0].tobytes(), "seeded"
    problems = train[:200]
    assert len({p.messages[0]["content"][1]["text"] for p in problems}) == 1, "the text never tells the answer"
    counts = {letter: sum(p.answer == letter for p in problems) for letter in "ABCD"}
    assert all(30 <= c <= 70 for c in counts.values()), counts
    p = problems[0]
    image = p.images[0]
    assert image.size == (56, 56) and p.messages[0]["content"][0] == {"type": "image"}
    square = max(set(image.getdata()), key=list(image.getdata()).count)
    expected = PALETTE[p.meta["color"]]
    grey = len(set(square)) == 1
    assert grey or all(abs(c - e) <= 20 for c, e in zip(square, expected))
    with pytest.raises(IndexError):
        train[100000]
    with pytest.raises(DataError, match="splits: train, test"):
        task().dataset("validation")


def test_reward_reads_the_first_choice_letter() -> None:
    t = task(colors=["red", "blue"])
    prompt = Prompt(messages=[], answer="B")
    assert t.reward("xB", prompt) == {"reward": 1.0, "correct": 1.0, "answered": 1.0}
    assert t.reward("AB", prompt)["reward"] == 0.0, "the first letter counts"
    assert t.reward("C D", prompt) == {"reward": 0.0, "correct": 0.0, "answered": 0.0}, "only the offered letters"


def test_options_and_checks() -> None:
    with pytest.raises(ConfigError, match="colors must be 2 to 8 distinct names"):
        build_options(Colors.Options, {"colors": ["red", "mauve"]}, "task")
    assert task().modalities() == ["image"]
    assert task().check_run(model_config=read_config(EMBEDDED_VL)) == []
    assert "text-only" in task().check_run(model_config=Qwen2Config())[0]


def test_contract() -> None:
    check_task(task(), responses=["A", "B", "no letter", "CD"])
