"""The math task: the real MATH-500 and AIME 2024 files, `\\boxed{}` and DAPO answers checked by
math-verify (equivalent forms score 1, wrong ones 0), the checker's timeout, verl parquet rows and bad rows."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from rlcore import Prompt
from rlcore.config import build_options
from rlcore.errors import ConfigError, DataError
from rlcore.plugins import Registry, instantiate, load
from rlcore.testing import check_task, make_batch
from rlcore_tasks.equivalence import Checker, CheckTimeout
from rlcore_tasks.math import TEMPLATES, Math

DATA = Path(__file__).resolve().parents[1] / "data"
MATH500, AIME24 = DATA / "math500" / "test.jsonl", DATA / "aime24" / "test.jsonl"
SLOW_ANSWER = r"2^{2^{2^{22}}}"
"""sympy works on this power for far longer than any timeout here."""


def task(**options: object) -> Math:
    return Math(build_options(Math.Options, options, "task"))


def scored(t: Math, texts: list[str], prompts: list[Prompt]):
    batch = make_batch(groups=1, n=len(texts))
    batch.texts, batch.prompts = list(texts), list(prompts)
    return t.score(batch)


def problem(answer: str) -> Prompt:
    return Prompt(messages=[{"role": "user", "content": "?"}], answer=answer)


@pytest.fixture(scope="module")
def boxed():
    """One task (one math-verify worker) for the tests that only score."""
    t = task(test_path=str(MATH500))
    yield t
    t.teardown()


# ---- the real files -----------------------------------------------------------------------------------

def test_math500_loads_with_its_fields(boxed):
    prompts = boxed.dataset("test")
    rows = [json.loads(line) for line in MATH500.read_text().splitlines()]
    assert len(prompts) == 500
    for p, row in zip(prompts, rows, strict=True):
        assert p.answer == row["answer"]
        assert p.messages == [{"role": "user", "content": TEMPLATES["boxed"].format(problem=row["problem"])}]
        assert p.meta["solution"] == row["solution"]
        assert all(p.meta[k] == row[k] for k in ("subject", "level", "unique_id"))
    assert prompts[0].messages[0]["content"].endswith("output the final answer within \\boxed{}.")


def test_math500_reference_solutions_score_one(boxed):
    """Every 5th reference solution (all 500 in the slow test): its last box is equivalent to the answer."""
    prompts = boxed.dataset("test")[::5]
    scores = scored(boxed, [p.meta["solution"] for p in prompts], prompts)
    assert scores.rewards.tolist() == [1.0] * len(prompts)


@pytest.mark.slow
def test_every_math500_reference_solution_scores_one(boxed):
    prompts = boxed.dataset("test")
    scores = scored(boxed, [p.meta["solution"] for p in prompts], prompts)
    assert scores.rewards.tolist() == [1.0] * 500


def test_aime24_loads_and_zero_padded_answers_compare_as_numbers(boxed):
    prompts = task(test_path=str(AIME24)).dataset("test")
    assert len(prompts) == 30 and {p.meta["id"] for p in prompts} == set(range(60, 90))
    padded = [p for p in prompts if p.answer.startswith("0")]
    assert len(padded) == 7
    texts = [f"so \\boxed{{{int(p.answer)}}}" for p in padded] + [f"\\boxed{{{int(p.answer) + 1}}}" for p in padded]
    assert scored(boxed, texts, padded * 2).rewards.tolist() == [1.0] * 7 + [0.0] * 7


# ---- equivalence ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("gold", "response"), [
    (r"\frac{1}{2}", r"The answer is $\boxed{0.5}$."),
    (r"\frac{1}{2}", r"\boxed{\dfrac12}"),
    (r"\frac{1}{2}", r"\boxed{1/2}"),
    ("0.5", r"\boxed{\frac{1}{2}}"),
    ("3", r"\boxed{x=3}"),
    ("x=3", r"\boxed{3}"),
    (r"(1, 2]", r"\boxed{\left(1,2\right]}"),
    (r"[-\infty, 3)", r"\boxed{[-\infty,3)}"),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\sqrt{2}/2}"),
    (r"\frac{\sqrt2}{2}", r"\boxed{\frac{1}{\sqrt{2}}}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \pi/2)}"),
    ("90^\\circ", r"\boxed{90}"),
    ("1,000", r"\boxed{1000}"),
    ("2x+3", r"\boxed{3+2x}"),
    (r"\text{Evelyn}", r"\boxed{\text{Evelyn}}"),
    ("5", r"\fbox{5}"),
])
def test_equivalent_answers_score_one(boxed, gold, response):
    s = scored(boxed, [response], [problem(gold)])
    assert s.rewards.tolist() == [1.0] and s.info[0]["correct"] == 1.0 and s.info[0]["format"] == 1.0


@pytest.mark.parametrize(("gold", "response"), [
    (r"\frac{1}{2}", r"\boxed{0.6}"),
    (r"\frac{1}{2}", r"\boxed{2}"),
    ("3", r"\boxed{x=4}"),
    (r"(1, 2]", r"\boxed{[1,2)}"),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\sqrt{3}/2}"),
    ("2x+3", r"\boxed{2x-3}"),
    (r"\text{Evelyn}", r"\boxed{\text{Bob}}"),
    ("5", r"the answer is 5"),
    ("5", r"\boxed{5"),
    ("5", ""),
])
def test_wrong_or_missing_answers_score_zero(boxed, gold, response):
    s = scored(boxed, [response], [problem(gold)])
    assert s.rewards.tolist() == [0.0] and s.info[0]["correct"] == 0.0 and s.info[0]["reward_error"] == 0.0


def test_the_last_box_is_the_answer(boxed):
    s = scored(boxed, [r"\boxed{3} no wait \boxed{4}", r"\boxed{4} no wait \boxed{3}"], [problem("4")] * 2)
    assert s.rewards.tolist() == [1.0, 0.0]
    assert [i["format"] for i in scored(boxed, ["4", r"\boxed{4}"], [problem("4")] * 2).info] == [0.0, 1.0]


def test_dapo_format_asks_for_and_reads_the_answer_line():
    t = task(format="dapo", test_path=str(AIME24))
    try:
        p = t.dataset("test")[0]
        content = p.messages[0]["content"]
        assert content.startswith("Solve the following math problem step by step. The last line of your response")
        assert content.endswith('Remember to put your answer on its own line after "Answer:".')
        texts = [f"work\nAnswer: {p.answer}", f"Answer: ${p.answer}$.", f"\\boxed{{{p.answer}}}", "Answer: 7"]
        s = scored(t, texts, [p] * 4)
        assert s.rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
        assert [i["format"] for i in s.info] == [1.0, 1.0, 0.0, 1.0]
    finally:
        t.teardown()


# ---- the checker's timeout ----------------------------------------------------------------------------------

def test_a_check_past_the_timeout_scores_zero_and_is_counted():
    t = task(timeout_s=1.0)
    try:
        start = time.perf_counter()
        s = scored(t, [rf"\boxed{{{SLOW_ANSWER}}}", r"\boxed{\frac{2}{4}}"], [problem("1"), problem(r"\frac12")])
        assert time.perf_counter() - start < 30  # the worker's start-up plus one timeout, not sympy's runtime
        assert s.rewards.tolist() == [0.0, 1.0]
        assert [i["timeout"] for i in s.info] == [1.0, 0.0] and [i["correct"] for i in s.info] == [0.0, 1.0]
        assert [i["reward_error"] for i in s.info] == [0.0, 0.0]
    finally:
        t.teardown()


def test_the_checker_works_off_the_main_thread_and_after_a_timeout():
    checker = Checker(timeout_s=1.0)
    results: list[object] = []

    def work() -> None:
        results.append(checker(r"\frac{1}{2}", "0.5"))
        try:
            checker("1", SLOW_ANSWER)
        except CheckTimeout as e:
            results.append(str(e))
        results.append(checker("3", "x = 3"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(120)
    checker.close()
    assert results == [True, "math-verify took longer than 1 s", True]


# ---- other row formats and bad rows ---------------------------------------------------------------------------

def test_verl_parquet_rows_load_unchanged(tmp_path):
    import datasets

    dapo = TEMPLATES["dapo"].format(problem="What is $1+1$?")
    rows = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": dapo}], "ability": "MATH",
             "reward_model": {"style": "rule", "ground_truth": "2"}, "extra_info": {"index": "a-1"}},
            {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Half of 1?"}], "ability": "MATH",
             "reward_model": {"style": "rule", "ground_truth": r"\frac{1}{2}"}, "extra_info": {"index": "a-2"}}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(rows[:1]).to_parquet(str(tmp_path / "test.parquet"))
    t = task(path=str(tmp_path), format="dapo")
    try:
        prompts = t.dataset("train")
        assert [p.messages for p in prompts] == [r["prompt"] for r in rows]
        assert [p.answer for p in prompts] == ["2", r"\frac{1}{2}"] and prompts[1].meta["extra_info"]["index"] == "a-2"
        assert len(t.dataset("test")) == 1
        assert scored(t, ["Answer: 2", "Answer: 0.5"], list(prompts)).rewards.tolist() == [1.0, 1.0]
    finally:
        t.teardown()


def test_rows_with_only_a_solution_take_its_last_box(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"problem": "P0", "solution": r"So $x=\boxed{\frac{1}{2}}$.", "level": "Level 1", "type": "Algebra"},
            {"problem": "P1", "answer": 7, "solution": r"\boxed{8}"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = task(train_path=str(path)).dataset("train")
    assert [p.answer for p in prompts] == [r"\frac{1}{2}", "7"]
    assert prompts[0].meta["type"] == "Algebra"


def test_bad_rows_are_rejected_or_skipped(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    rows = [{"problem": "P0", "answer": "1"}, {"problem": "P1", "solution": "no box"}, {"answer": "2"},
            {"problem": "P3", "answer": "3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: no field 'answer', and no \\boxed\{\} answer"):
        task(train_path=str(path)).dataset("train")
    prompts = task(train_path=str(path), bad_rows="skip").dataset("train")
    assert [p.answer for p in prompts] == ["1", "3"]
    assert "row 2: missing field 'problem' (or 'question')" in caplog.text


# ---- options, contract, registration -------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "names"), [
    ({"format": "latex"}, ["format", "'boxed', 'dapo'"]),
    ({"timeout_s": 0}, ["timeout_s", "at least 0.01"]),
    ({"timeout_s": "soon"}, ["task.timeout_s", "float"]),
    ({"bad_rows": "drop"}, ["bad_rows"]),
])
def test_bad_options_name_the_key(options, names):
    with pytest.raises(ConfigError) as e:
        build_options(Math.Options, options, "task")
    assert all(name in str(e.value) for name in names)


def test_contract(tmp_path):
    (tmp_path / "train.jsonl").write_text(MATH500.read_text())
    t = task(path=str(tmp_path))
    try:
        check_task(t, responses=["", r"\boxed{42}", "Answer: 7", r"\boxed{"])
    finally:
        t.teardown()


def test_registered_as_the_math_task_with_a_test_split_for_eval():
    cls = load("task", "math")
    assert cls is Math
    registry = Registry()
    registry.register("task", "math", instantiate(cls, {"test_path": str(MATH500)}, "task"))
    prompts = registry.hook.dataset(split="test")
    assert len(prompts) == 500
    batch = make_batch(groups=2, n=2)
    batch.prompts = [prompts[0], prompts[0], prompts[1], prompts[1]]
    batch.texts = [rf"\boxed{{{prompts[0].answer}}}", r"\boxed{-1}", rf"\boxed{{{prompts[1].answer}}}", ""]
    scores = registry.hook.score(batch=batch)
    registry.hook.teardown()
    assert torch.equal(scores.rewards, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert [i["correct"] for i in scores.info] == [1.0, 0.0, 1.0, 0.0]
