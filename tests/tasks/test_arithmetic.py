"""The arithmetic task: seeded lazy problems, answer extraction, exact-answer reward, options."""

from __future__ import annotations

import random
import re
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcore import Prompt
from rlcore.config import build_options
from rlcore.errors import ConfigError, RLCoreError
from rlcore.models import TINY_CHARS
from rlcore.plugins import Registry, instantiate, load
from rlcore.testing import check_task, make_batch
from rlcore_tasks.arithmetic import Arithmetic, extract


def task(**options: object) -> Arithmetic:
    return Arithmetic(build_options(Arithmetic.Options, options, "task"))


def scored(t: Arithmetic, texts: list[str], prompts: list[Prompt]):
    """Score `texts` answering `prompts` through the task's score hook."""
    batch = make_batch(groups=1, n=len(texts))
    batch.texts, batch.prompts = list(texts), list(prompts)
    return t.score(batch)


def problem(answer: str) -> Prompt:
    return Prompt(messages=[{"role": "user", "content": "?"}], answer=answer, id=f"p{answer}")


# ---- dataset ----------------------------------------------------------------------------------------

def test_same_seed_same_problems_different_seed_differs():
    a, b, c = task(seed=1).dataset("train"), task(seed=1).dataset("train"), task(seed=2).dataset("train")
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert [a[i].messages for i in range(50)] != [c[i].messages for i in range(50)]


def test_splits_differ_and_ids_are_unique():
    t = task(train_size=200, test_size=200)
    train, test = t.dataset("train"), t.dataset("test")
    assert [p.messages for p in train] != [p.messages for p in test]
    ids = [p.id for p in train] + [p.id for p in test]
    assert len(set(ids)) == len(ids) == 400


def test_dataset_is_lazy_and_sized():
    t = task(train_size=10**9, test_size=7)
    start = time.perf_counter()
    train = t.dataset("train")
    last = train[10**9 - 1]
    assert time.perf_counter() - start < 1.0
    assert len(train) == 10**9 and last.id == f"train-{10**9 - 1}"
    assert len(t.dataset("test")) == 7
    assert (len(task().dataset("train")), len(task().dataset("test"))) == (100_000, 500)


def test_indexing_follows_sequence_rules():
    ds = task(test_size=5).dataset("test")
    assert ds[-1] == ds[4] and ds[-5] == ds[0]
    assert ds[1:3] == [ds[1], ds[2]] and ds[::-2] == [ds[4], ds[2], ds[0]]
    assert list(ds) == [ds[i] for i in range(5)]
    for bad in (5, 6, -6, 10**12):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(TypeError):
        ds["0"]


def test_unknown_split_names_the_splits():
    with pytest.raises(RLCoreError, match=r"'validation'.*train, test"):
        task().dataset("validation")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-10**6, 10**6), low=st.integers(0, 50), span=st.integers(0, 50),
       index=st.integers(0, 999), style=st.sampled_from(["compact", "instruct"]))
def test_answers_match_python_eval_for_every_op(seed, low, span, index, style):
    p = task(seed=seed, min_operand=low, max_operand=low + span, ops="+-*", style=style).dataset("train")[index]
    content = p.messages[0]["content"]
    if style == "compact":
        assert re.fullmatch(r"\d+[+\-*]\d+=", content) and set(content) <= set(TINY_CHARS)
        expr = content[:-1]
    else:
        expr = re.fullmatch(r"What is (\d+ [+\-*] \d+)\? Answer with just the number\.", content).group(1)
    a, b = p.meta["operands"]
    assert low <= a <= low + span and low <= b <= low + span
    assert expr.replace(" ", "") == f"{a}{p.meta['op']}{b}"
    assert p.answer == str(eval(expr))  # noqa: S307 - operands and operator checked by the regex above
    assert p.messages[0]["role"] == "user"


def test_every_configured_op_is_drawn_and_only_those():
    ds = task(ops="-*", test_size=200).dataset("test")
    assert {p.meta["op"] for p in ds} == {"-", "*"}
    assert any(p.answer.startswith("-") for p in ds)
    assert {p.meta["op"] for p in task(test_size=50).dataset("test")} == {"+"}


def test_default_prompt_is_compact_and_instruct_asks_in_words():
    p = task(seed=3).dataset("train")[0]
    a, b = p.meta["operands"]
    assert p.messages == [{"role": "user", "content": f"{a}+{b}="}] and p.answer == str(a + b)
    q = task(seed=3, style="instruct").dataset("train")[0]
    assert q.messages[0]["content"] == f"What is {a} + {b}? Answer with just the number."
    assert q.answer == p.answer


# ---- extraction and reward ----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "strict", "first", "last"), [
    ("7", 7, 7, 7),
    ("  -3\n", -3, -3, -3),
    ("", None, None, None),
    ("   ", None, None, None),
    ("+-*=", None, None, None),
    ("<unk>", None, None, None),
    ("The answer is 12.", None, 12, 12),
    ("3+4=7", None, 3, 7),
    ("5-3=2", None, 5, 2),
    ("it is -8, not 8", None, -8, 8),
    ("12 or 13", None, 12, 13),
    ("1,234", 1234, 1234, 1234),
    ("7.0", 7, 7, 7),
    ("7.5 then 2", None, 7.5, 2),
    ("--3", None, -3, -3),
    ("007", 7, 7, 7),
])
def test_extraction_modes(text, strict, first, last):
    assert (extract(text, "strict"), extract(text, "first"), extract(text, "last")) == (strict, first, last)


def test_score_rewards_correct_answers_and_reports_format():
    t = task()
    prompts = [problem("7"), problem("7"), problem("7"), problem("-3"), problem("12"), problem("7")]
    s = scored(t, ["7", "3+4=7", "8", "-3", "x12y", ""], prompts)
    assert s.rewards.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert [i["correct"] for i in s.info] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert [i["format"] for i in s.info] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert all(i["reward_error"] == 0.0 for i in s.info)


def test_extract_option_changes_what_counts():
    texts, prompts = ["7 or 9", "9 or 7", " 7 "], [problem("7")] * 3
    assert scored(task(extract="first"), texts, prompts).rewards.tolist() == [1.0, 0.0, 1.0]
    assert scored(task(extract="last"), texts, prompts).rewards.tolist() == [0.0, 1.0, 1.0]
    assert scored(task(extract="strict"), texts, prompts).rewards.tolist() == [0.0, 0.0, 1.0]


def test_format_reward_adds_to_the_reward():
    s = scored(task(format_reward=0.5), ["7", "8", "so 7", "so 8"], [problem("7")] * 4)
    assert s.rewards.tolist() == [1.5, 0.5, 1.0, 0.0]


def test_malformed_answer_scores_zero_and_is_counted():
    prompts = [problem("7"), problem("seven"), Prompt(messages=[], answer=None, id="none"), problem("7")]
    s = scored(task(), ["7", "7", "7", "7"], prompts)
    assert s.rewards.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert [i["reward_error"] for i in s.info] == [0.0, 1.0, 1.0, 0.0]


def test_random_responses_earn_a_low_but_nonzero_varied_reward():
    """GRPO needs signal from a random-init model: random 4-character responses over the tiny alphabet
    must be right sometimes (1-30%), so some groups of 8 have rewards that differ."""
    groups, n = 1000, 8
    t = task()
    ds = t.dataset("train")
    rng = random.Random(0)
    texts = ["".join(rng.choice(TINY_CHARS) for _ in range(4)) for _ in range(groups * n)]
    batch = make_batch(groups=groups, n=n)
    batch.texts, batch.prompts = texts, [ds[g] for g in range(groups) for _ in range(n)]
    rewards = t.score(batch).rewards.view(groups, n)
    assert 0.01 <= rewards.mean().item() <= 0.30
    assert (rewards.std(dim=1) > 0).float().mean().item() >= 0.05


# ---- options and registration ---------------------------------------------------------------------

@pytest.mark.parametrize(("options", "names"), [
    ({"min_operand": -1}, ["min_operand", "at least 0"]),
    ({"min_operand": 5, "max_operand": 3}, ["max_operand=3", "min_operand=5"]),
    ({"ops": "+/"}, ["ops", "'/'", "'+', '-', '*'"]),
    ({"ops": ""}, ["ops"]),
    ({"style": "verbose"}, ["style", "'compact', 'instruct'"]),
    ({"extract": "middle"}, ["extract", "'strict', 'first', 'last'"]),
    ({"train_size": 0}, ["train_size"]),
    ({"test_size": -1}, ["test_size"]),
    ({"format_reward": -0.5}, ["format_reward"]),
    ({"max_operand": "nine"}, ["task.max_operand", "int"]),
    ({"operators": "+"}, ["task.operators", "unknown option", "ops"]),
])
def test_bad_options_name_the_key(options, names):
    with pytest.raises(ConfigError) as e:
        build_options(Arithmetic.Options, options, "task")
    for name in names:
        assert name in str(e.value)


def test_options_from_cli_strings():
    o = build_options(Arithmetic.Options, {"max_operand": "20", "ops": "+-*", "format_reward": "0.1"}, "task")
    assert (o.max_operand, o.ops, o.format_reward) == (20, "+-*", 0.1)


@pytest.mark.parametrize("options", [{}, {"style": "instruct", "ops": "+-*", "extract": "strict"}])
def test_contract(options):
    check_task(task(**options))


def test_registered_as_the_arithmetic_task_and_fits_the_contract():
    cls = load("task", "arithmetic")
    assert cls is Arithmetic
    registry = Registry()
    registry.register("task", "arithmetic", instantiate(cls, {"test_size": 3}, "task"))
    prompts = registry.hook.dataset(split="test")
    assert len(prompts) == 3
    batch = make_batch(groups=3, n=1)
    batch.prompts, batch.texts = list(prompts), [p.answer for p in prompts]
    scores = registry.hook.score(batch=batch)
    assert torch.equal(scores.rewards, torch.ones(3))


# ---- calculator mode ----------------------------------------------------------------------------------------

def test_the_calculator_is_offered_only_in_calculator_mode():
    assert task().tools() == []
    assert [t.name for t in task(calculator=True).tools()] == ["calculator"]


def test_demonstrations_solve_each_problem_with_the_calculator_at_the_configured_rate():
    t = task(min_operand=317, max_operand=999, ops="*", calculator=True, demo_tool_rate=0.25)
    demos, problems = t.demonstrations("train"), t.dataset("train")
    assert len(demos) == len(problems) and demos[5] == demos[5]
    used = 0
    for i in range(400):
        demo, p = demos[i], problems[i]
        assert demo[:-1][:1] == p.messages and demo[-1] == {"role": "assistant", "content": p.answer}
        if len(demo) == 4:
            used += 1
            call = demo[1]["tool_calls"][0]["function"]
            assert call == {"name": "calculator", "arguments": {"expression": p.messages[0]["content"][:-1]}}
            assert demo[2] == {"role": "tool", "content": p.answer}, "the calculator's answer is the reference"
    assert 60 < used < 140, f"{used} of 400 demonstrations use the calculator at rate 0.25"
    assert all(len(d) == 2 for d in task(calculator=True, demo_tool_rate=0.0).demonstrations("train")[:50])
    assert all(len(d) == 2 for d in task(demo_tool_rate=1.0).demonstrations("train")[:50]), "no tool offered"


def test_calculator_mode_reads_the_last_assistant_turn():
    """Neither the tool's answer nor the numbers of the call count: only what the model says at the end."""
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
    turns = [[{"role": "assistant", "content": call}, {"role": "tool", "content": "42"},
              {"role": "assistant", "content": "42"}],
             [{"role": "assistant", "content": call}, {"role": "tool", "content": "42"},
              {"role": "assistant", "content": "41"}],
             [{"role": "assistant", "content": call}]]
    batch = make_batch(groups=1, n=4)
    batch.prompts = [problem("42")] * 4
    batch.texts = [call + "42" + "42", call + "42" + "41", call, "42"]
    batch.info = [{"messages": m} for m in turns] + [{}]
    assert task(calculator=True, extract="strict").score(batch).rewards.tolist() == [1, 0, 0, 1]
