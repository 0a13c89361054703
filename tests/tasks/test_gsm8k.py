"""The gsm8k task on real GSM8K rows (the first rows of each split, and every row whose answer has a
thousands separator or a minus sign): loading (jsonl, verl parquet), bad rows, prompts, rewards, multi-turn
tools, options and registration."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from rlcore import Prompt
from rlcore.config import build_options
from rlcore.errors import ConfigError, DataError
from rlcore.plugins import Registry, instantiate, load
from rlcore.testing import check_task, make_batch
from rlcore_tasks.gsm8k import GSM8K, INSTRUCTION, TOOL_SYSTEM_PROMPT

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "gsm8k"
"""The first 64 train and 16 test rows of GSM8K."""
SIGNED_ROWS = REPO / "tests" / "data" / "gsm8k"
"""Every other GSM8K row whose final answer has a thousands separator or a minus sign (82 train, 16 test)."""


def task(**options: object) -> GSM8K:
    return GSM8K(build_options(GSM8K.Options, options, "task"))


def scored(t: GSM8K, texts: list[str], prompts: list[Prompt]):
    batch = make_batch(groups=1, n=len(texts))
    batch.texts, batch.prompts = list(texts), list(prompts)
    return t.score(batch)


def problem(answer: str) -> Prompt:
    return Prompt(messages=[{"role": "user", "content": "?"}], answer=answer)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def raw_rows(split: str, count: int) -> list[dict]:
    with open(DATA / f"{split}.jsonl") as f:
        return [json.loads(next(f)) for _ in range(count)]


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.fixture(scope="module")
def real() -> GSM8K:
    return task(path=str(DATA))


# ---- the real files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", [DATA, SIGNED_ROWS], ids=["first-rows", "signed-rows"])
def test_real_rows_load_fully_and_every_reference_solution_scores_one(folder):
    t = task(path=str(folder))
    train, test = t.dataset("train"), t.dataset("test")
    assert (len(train), len(test)) == (line_count(folder / "train.jsonl"), line_count(folder / "test.jsonl"))
    prompts = list(train) + list(test)
    assert len({p.id for p in prompts}) == len(prompts)
    scores = scored(t, [p.meta["solution"] for p in prompts], prompts)
    assert scores.rewards.tolist() == [1.0] * len(prompts)
    assert all(i["correct"] == 1.0 and i["format"] == 1.0 and i["reward_error"] == 0.0 for i in scores.info)


def test_prompts_follow_verls_template(real):
    raw = raw_rows("test", 3)
    for p, row in zip(real.dataset("test")[:3], raw, strict=True):
        assert p.messages == [{"role": "user", "content": f"{row['question']} {INSTRUCTION}"}]
        assert p.answer == row["answer"].split("####")[-1].strip().replace(",", "")
        assert p.tools is None and p.meta["solution"] == row["answer"]
    assert INSTRUCTION == 'Let\'s think step by step and output the final answer after "####".'


def test_answers_with_commas_are_plain_numbers_and_keep_their_sign():
    signed = list(task(path=str(SIGNED_ROWS)).dataset("train"))
    with_commas = [p for p in signed if "," in p.meta["solution"].rsplit("####", 1)[1]]
    assert len(with_commas) == 79 and all(p.answer.isdigit() for p in with_commas)
    negative = [p for p in signed if p.meta["solution"].rsplit("####", 1)[1].strip().startswith("-")]
    assert len(negative) == 3 and all(p.answer.startswith("-") and p.answer[1:].isdigit() for p in negative)


def test_split_files_and_explicit_paths(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", raw_rows("train", 5))
    write_jsonl(tmp_path / "test.jsonl", raw_rows("test", 3))
    assert (len(task(path=str(tmp_path)).dataset("train")), len(task(path=str(tmp_path)).dataset("test"))) == (5, 3)
    t = task(path="/nowhere", train_path=str(tmp_path / "test.jsonl"), test_path=str(tmp_path / "train.jsonl"))
    assert (len(t.dataset("train")), len(t.dataset("test"))) == (3, 5)
    with pytest.raises(DataError, match="single file.*task.test_path"):
        task(path=str(tmp_path / "train.jsonl")).dataset("test")
    with pytest.raises(DataError, match=r"'/nowhere/x.jsonl' does not exist"):
        task(train_path="/nowhere/x.jsonl").dataset("train")
    with pytest.raises(DataError, match="unknown type"):
        task(train_path=str(write_jsonl(tmp_path / "rows.txt", []))).dataset("train")
    (tmp_path / "only").mkdir()
    write_jsonl(tmp_path / "only" / "train.jsonl", raw_rows("train", 2))
    with pytest.raises(DataError, match="no test files.*task.test_path"):
        task(path=str(tmp_path / "only")).dataset("test")


def test_a_hub_id_without_network_names_the_local_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="openai/gsm8k.*task.path to a local directory"):
        task().dataset("train")


def test_unknown_split_names_the_splits(real):
    with pytest.raises(DataError, match=r"'validation'.*train, test"):
        real.dataset("validation")


# ---- verl's parquet format ------------------------------------------------------------------------------

def verl_rows(split: str, count: int, multi_turn: bool = False) -> list[dict]:
    """Rows as verl's examples/data_preprocess/gsm8k(_multiturn_w_tool).py writes them."""
    out = []
    for idx, row in enumerate(raw_rows(split, count)):
        solution = row["answer"].split("#### ")[1].replace(",", "")
        messages = [{"role": "user", "content": row["question"] + " " + INSTRUCTION}]
        extra = {"split": split, "index": idx, "answer": row["answer"], "question": row["question"]}
        if multi_turn:
            messages.insert(0, {"role": "system", "content": "You are a math expert. Use `calc_gsm8k_reward`."})
            extra["tools_kwargs"] = {"calc_gsm8k_reward": {"create_kwargs": {"ground_truth": solution}}}
        out.append({"data_source": "openai/gsm8k", "prompt": messages, "ability": "math",
                    "reward_model": {"style": "rule", "ground_truth": solution}, "extra_info": extra})
    return out


@pytest.mark.parametrize("multi_turn", [False, True])
def test_verl_parquet_files_load_unchanged(tmp_path, multi_turn):
    import datasets

    for split, count in (("train", 6), ("test", 4)):
        datasets.Dataset.from_list(verl_rows(split, count, multi_turn)).to_parquet(str(tmp_path / f"{split}.parquet"))
    t = task(path=str(tmp_path), multi_turn=multi_turn)
    train, test = t.dataset("train"), t.dataset("test")
    assert (len(train), len(test)) == (6, 4)
    for p, row in zip(test, verl_rows("test", 4, multi_turn), strict=True):
        assert p.messages == row["prompt"]
        assert p.answer == row["reward_model"]["ground_truth"]
        assert p.meta["extra_info"]["index"] == row["extra_info"]["index"]
        assert p.meta["data_source"] == "openai/gsm8k" and p.meta["ability"] == "math"
    scores = scored(t, [p.meta["extra_info"]["answer"] for p in test], list(test))
    assert scores.rewards.tolist() == [1.0] * 4


# ---- bad rows --------------------------------------------------------------------------------------------

BAD = [
    {"question": "Q0", "answer": "1+1=2\n#### 2"},
    {"question": "Q1"},
    {"question": "Q2", "answer": "no final line"},
    {"question": "", "answer": "#### 3"},
    {"question": "Q4", "answer": "#### four"},
    {"question": "Q5", "answer": "#### 5"},
]


def test_bad_rows_are_rejected_with_file_index_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(DataError) as e:
        task(train_path=str(path)).dataset("train")
    assert str(path) in str(e.value) and "row 1: missing field 'answer'" in str(e.value)
    assert "task.bad_rows=skip" in str(e.value)


def test_bad_rows_are_skipped_and_named_when_asked(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD)
    with caplog.at_level(logging.WARNING, logger="rlcore.tasks"):
        prompts = task(train_path=str(path), bad_rows="skip").dataset("train")
    assert [p.meta["index"] for p in prompts] == [0, 5] and [p.answer for p in prompts] == ["2", "5"]
    warning = caplog.text
    assert str(path) in warning and "skipped 4 bad rows of 6" in warning
    for needle in ("row 1: missing field 'answer'", "row 2: field 'answer': no '#### <answer>' line",
                   "row 3: missing field 'question'", "row 4: field 'answer': 'four' is not a number"):
        assert needle in warning


def test_bad_verl_rows_name_the_nested_field(tmp_path):
    import datasets

    rows = verl_rows("train", 3)
    rows[1]["reward_model"] = {"style": "rule", "ground_truth": ""}
    rows[2]["reward_model"] = {"style": "rule", "ground_truth": "1/2"}
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=r"row 1: missing field 'reward_model.ground_truth'"):
        task(train_path=str(path)).dataset("train")
    assert len(task(train_path=str(path), bad_rows="skip").dataset("train")) == 1


def test_a_file_of_only_bad_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q"}] * 3)
    with pytest.raises(DataError, match="no usable rows"):
        task(train_path=str(path), bad_rows="skip").dataset("train")


# ---- rewards ------------------------------------------------------------------------------------------------

def test_strict_and_flexible_rewards():
    texts = ["so\n#### 72", "#### 72.0", "#### $72", "The answer is 72", "#### 71", "#### 72\nor 73", ""]
    prompts = [problem("72")] * len(texts)
    strict, flexible = scored(task(), texts, prompts), scored(task(extract="flexible"), texts, prompts)
    assert strict.rewards.tolist() == [1, 1, 1, 0, 0, 1, 0]
    assert flexible.rewards.tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert [i["format"] for i in strict.info] == [1, 1, 1, 0, 1, 1, 0]
    assert [i["correct"] for i in flexible.info] == flexible.rewards.tolist()


def test_big_and_negative_answers():
    s = scored(task(), ["#### 1,234,567", "#### 1234567", "#### -5", "#### 5"],
               [problem("1234567"), problem("1234567"), problem("-5"), problem("-5")])
    assert s.rewards.tolist() == [1, 1, 1, 0]


def test_an_unparseable_reference_scores_zero_and_is_counted():
    s = scored(task(), ["#### 3", "#### 3"], [problem("three"), problem("3")])
    assert s.rewards.tolist() == [0, 1] and [i["reward_error"] for i in s.info] == [1, 0]


# ---- multi-turn -----------------------------------------------------------------------------------------------

def test_multi_turn_offers_tools_and_tells_the_model_to_use_them(real):
    assert real.tools() == []
    t = task(path=str(DATA), multi_turn=True)
    assert [tool.name for tool in t.tools()] == ["calculator", "calc_gsm8k_reward"]
    p = t.dataset("test")[0]
    assert p.messages[0] == {"role": "system", "content": TOOL_SYSTEM_PROMPT}
    assert p.messages[1] == real.dataset("test")[0].messages[0]
    assert all(f"`{name}`" in TOOL_SYSTEM_PROMPT for name in ("calculator", "calc_gsm8k_reward"))


def test_multi_turn_scores_the_models_words_not_the_tool_output():
    call = '<tool_call>{"name": "calc_gsm8k_reward", "arguments": {"answer": "72"}}</tool_call>\n'
    texts = [call + "user\n<tool_response>\nCurrent parsed answer='#### 72' reward=1.0\n</tool_response>\n",
             call + "user\n<tool_response>\nreward=1.0\n</tool_response>\nassistant\nSo the total is\n#### 72"]
    assert scored(task(multi_turn=True), texts, [problem("72")] * 2).rewards.tolist() == [0, 1]
    assert scored(task(), texts, [problem("72")] * 2).rewards.tolist() == [1, 1]
    flexible = scored(task(multi_turn=True, extract="flexible"), texts, [problem("1")] * 2)
    assert flexible.rewards.tolist() == [0, 0]


def test_answer_tool_uses_the_prompts_ground_truth(real):
    t = task(path=str(DATA), multi_turn=True)
    p = t.dataset("test")[0]
    check = t.tools()[1]
    state = check.create(p)
    assert check.execute(state, {"answer": p.answer}).text.endswith("reward=1.0")


# ---- options, contract, registration -------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "names"), [
    ({"extract": "last"}, ["extract", "'strict', 'flexible'"]),
    ({"bad_rows": "ignore"}, ["bad_rows", "'skip', 'error'"]),
    ({"multi_turn": "maybe"}, ["task.multi_turn", "bool"]),
    ({"file": "x"}, ["task.file", "unknown option", "train_path"]),
])
def test_bad_options_name_the_key(options, names):
    with pytest.raises(ConfigError) as e:
        build_options(GSM8K.Options, options, "task")
    assert all(name in str(e.value) for name in names)


@pytest.mark.parametrize("options", [{}, {"multi_turn": True, "extract": "flexible"}])
def test_contract(options):
    check_task(task(path=str(DATA), **options))


def test_registered_as_the_gsm8k_task_with_a_test_split_for_eval():
    cls = load("task", "gsm8k")
    assert cls is GSM8K
    registry = Registry()
    registry.register("task", "gsm8k", instantiate(cls, {"path": str(DATA)}, "task"))
    prompts = registry.hook.dataset(split="test")
    assert len(prompts) == line_count(DATA / "test.jsonl")
    batch = make_batch(groups=2, n=2)
    batch.prompts = [prompts[0], prompts[0], prompts[1], prompts[1]]
    batch.texts = [f"#### {prompts[0].answer}", "#### -1", f"#### {prompts[1].answer}", ""]
    scores = registry.hook.score(batch=batch)
    assert torch.equal(scores.rewards, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert [i["correct"] for i in scores.info] == [1.0, 0.0, 1.0, 0.0]
