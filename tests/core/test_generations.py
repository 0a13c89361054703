"""Generation tables: which samples, what each row says, the jsonl file, the hook, and resuming."""

from pathlib import Path

import torch

from rlcore.generations import GenerationLog, pick, prompt_text, read, rows_of, table
from rlcore.testing import make_batch
from rlcore.types import Prompt, Scores


class Recorder:
    """Stands in for the plugin manager's `hook` relay: records `log_generations` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, list[dict]]] = []

    def log_generations(self, step: int, split: str, rows: list[dict]) -> None:
        self.calls.append((step, split, rows))


def test_samples_are_spread_over_the_batch_without_randomness() -> None:
    assert pick(16, 4) == [0, 4, 8, 12] and pick(10, 3) == [0, 3, 6] and pick(2, 4) == [0, 1]
    state = torch.random.get_rng_state()
    rows_of(make_batch(groups=4, n=4), step=1, split="train", samples=4)
    assert torch.equal(state, torch.random.get_rng_state()), "logging never changes a run"


def test_a_row_holds_prompt_response_reward_finish_reason_tool_calls_and_score_details() -> None:
    batch = make_batch(groups=2, n=2, rewards=[1.0, 0.0, 0.5, 0.25], lengths=[6, 2, 3, 6])
    batch.info = [{"finish_reason": "stop", "correct": 1.0, "format": 1.0},
                  {"tool_calls": 2, "tool_errors": 1, "correct": 0.0, "note": "x", "ignored": [1, 2]},
                  {}, {"turns": 3}]
    rows = rows_of(batch, step=7, split="train", samples=4)
    assert [r["reward"] for r in rows] == [1.0, 0.0, 0.5, 0.25]
    assert rows[0] == {"step": 7, "split": "train", "prompt": "user: q0", "response": "xxxxxx", "reward": 1.0,
                       "finish_reason": "stop", "tool_calls": None, "correct": 1.0, "format": 1.0}
    assert rows[1]["tool_calls"] == 2 and rows[1]["tool_errors"] == 1 and rows[1]["note"] == "x"
    assert "ignored" not in rows[1], "only scalar details go into a table"
    # without an engine's finish reason, the truncation flag says it
    assert rows[1]["finish_reason"] == "stop" and rows[3]["finish_reason"] == "length"
    columns, data = table(rows)
    assert columns[:7] == ["step", "split", "prompt", "response", "reward", "finish_reason", "tool_calls"]
    assert set(columns[7:]) == {"correct", "format", "tool_errors", "note", "turns"}
    assert len(data) == 4 and all(len(r) == len(columns) for r in data)
    assert data[2][columns.index("correct")] is None


def test_prompt_text_renders_every_message_and_marks_images() -> None:
    prompt = Prompt(messages=[{"role": "system", "content": "be brief"},
                              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "area?"}]}])
    assert prompt_text(prompt) == "system: be brief\nuser: <image> area?"


def test_the_log_writes_every_nth_step_and_the_first_eval_batch(tmp_path: Path) -> None:
    hook = Recorder()
    log = GenerationLog(tmp_path, hook, every=2, samples=2)
    for step in (1, 2, 3, 4):
        log.train(step, make_batch(groups=2, n=2, seed=step))
    log.train(6, None)  # every group filtered out: nothing to show
    on_batch = log.evaluation(4)
    batch = make_batch(groups=2, n=2, seed=9)
    on_batch(batch, Scores(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), info=[{"correct": 1.0}] * 4))
    on_batch(make_batch(groups=2, n=2, seed=10), Scores(rewards=torch.zeros(4)))  # later chunks: not logged
    assert [(s, split, len(rows)) for s, split, rows in hook.calls] == [(2, "train", 2), (4, "train", 2), (4, "eval", 2)]
    assert hook.calls[-1][2][0]["reward"] == 1.0 and hook.calls[-1][2][0]["correct"] == 1.0
    tables = read(tmp_path)
    assert list(tables) == [(2, "train"), (4, "eval"), (4, "train")]
    assert tables[(4, "eval")] == hook.calls[-1][2], "the file holds what the trackers got"


def test_off_logs_nothing_and_a_resume_keeps_the_tables_up_to_the_checkpoint(tmp_path: Path) -> None:
    hook = Recorder()
    off = GenerationLog(tmp_path, hook, every=0, samples=2)
    off.train(10, make_batch())
    off.evaluation(10)(make_batch(), Scores(rewards=torch.zeros(8)))
    assert hook.calls == [] and read(tmp_path) == {}
    log = GenerationLog(tmp_path, hook, every=1, samples=1)
    for step in (1, 2, 3):
        log.train(step, make_batch(seed=step))
    resumed = GenerationLog(tmp_path, hook, every=1, samples=1, keep_until=2)
    resumed.train(3, make_batch(seed=30))
    tables = read(tmp_path)
    assert [k[0] for k in tables] == [1, 2, 3] and len(tables[(3, "train")]) == 1
    fresh = GenerationLog(tmp_path, hook, every=1, samples=1)
    assert read(tmp_path) == {} and fresh.every == 1, "a new run in the directory starts the file anew"
