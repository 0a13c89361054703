"""GSM8K grade-school math word problems: verl's prompt, `#### N` answers, a multi-turn mode with a
calculator and verl's answer-check tool (the `gsm8k_tool` recipe), and an interaction mode in which a
simulated user says whether the answer is right and asks for another try (the `_w_interaction` recipe).

Rows are GSM8K's own (`question`, `answer` ending in `#### N`) or verl's parquet rows (`prompt` chat
messages, `reward_model.ground_truth`), whose messages are used unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from rlcore import Interaction, Prompt, RolloutBatch, Scores, Tool, hookimpl
from rlcore.config import check_choice
from rlcore.errors import DataError
from rlcore.scoring import score_each
from rlcore_tasks.answers import gsm8k_answer, gsm8k_reference, parse_number, plain_number, without_tool_responses
from rlcore_tasks.datafiles import BAD_ROWS, BadRow, field, is_verl_row, load_split, to_prompts, verl_fields
from rlcore_tasks.interactions import GSM8KInteraction
from rlcore_tasks.tools import Calculator, GSM8KAnswerCheck

SPLITS = ("train", "test")
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
TOOL_SYSTEM_PROMPT = (
    "You are a math expert. You are given a question and you need to solve it step by step. "
    "Reason step by step before any tool call. Use the `calculator` tool for arithmetic. "
    "You should use the `calc_gsm8k_reward` tool after solving the question step by step, before giving "
    "the final answer, at least once, and refine your answer if necessary. "
    "Put your final answer in the format of `#### <answer>`."
)
"""verl's system prompt for its GSM8K multi-turn recipe, naming the calculator too."""
INTERACTION_SYSTEM_PROMPT = (
    "You are a math expert. You are given a question and you need to solve it step by step. "
    "You should rethinking carefully if user point out your answer is wrong. "
    "Put your final answer in the format of `#### <answer>`."
)
"""verl's system prompt for its GSM8K recipe with an interaction (`gsm8k_multiturn_w_interaction.py`), verbatim."""


class GSM8K:
    """GSM8K: `dataset` reads the split's rows, `score` compares the response's final number with the
    reference; with `multi_turn`, `tools` offers a calculator and the answer check; with `interaction`, a
    simulated user answers each turn (`interaction`)."""

    @attrs.define
    class Options:
        path: str = "openai/gsm8k"
        """Where both splits are: a local directory (train / test files, jsonl or parquet) or a hub id."""
        subset: str = "main"
        """The hub dataset's config name (GSM8K's are `main` and `socratic`); ignored for local files."""
        train_path: str = ""
        """A jsonl / parquet file (or directory, or hub id) holding the train split alone; overrides `path`."""
        test_path: str = ""
        """The same for the test split."""
        extract: str = attrs.field(default="strict", validator=check_choice("strict", "flexible"))
        """How the answer is read: the number after the last `####` (`strict`), or the last number
        (`flexible`)."""
        multi_turn: bool = False
        """Offer the calculator and `calc_gsm8k_reward` tools and tell the model to use them."""
        interaction: bool = False
        """Answer the model between turns as verl's GSM8K interaction does ("Your response is incorrect! You need
        to reflect on your answer and try again."), until it is right or the rollout's turn limits end it."""
        bad_rows: str = attrs.field(default="error", validator=check_choice(*BAD_ROWS))
        """A row with a missing field or an unparseable answer: `error` stops with its file, index and
        field; `skip` leaves it out with a warning naming it."""

    def __init__(self, options: Options) -> None:
        self.options = options

    @hookimpl
    def dataset(self, split: str) -> Sequence[Prompt]:
        """The split's problems, loaded through `datasets` and checked row by row."""
        if split not in SPLITS:
            raise DataError(f"gsm8k has no split {split!r}; splits: {', '.join(SPLITS)}")
        o = self.options
        rows, source = load_split(split, o.path, o.train_path if split == "train" else o.test_path, o.subset)
        return to_prompts(rows, lambda row, i: self.prompt(row, f"{split}-{i}", i), source, o.bad_rows)

    def prompt(self, row: Mapping[str, Any], prompt_id: str, index: int) -> Prompt:
        """One row as a Prompt whose answer is the reference number as text ("1000")."""
        if is_verl_row(row):
            messages, truth, rest = verl_fields(row)
            try:
                answer = plain_number(truth)
            except ValueError as e:
                raise BadRow(f"field 'reward_model.ground_truth': {e}") from None
            return Prompt(messages=messages, answer=answer, id=prompt_id, meta={"index": index, **rest})
        question, solution = field(row, "question"), str(field(row, "answer"))
        try:
            truth = gsm8k_reference(solution)
        except ValueError as e:
            raise BadRow(f"field 'answer': {e}") from None
        messages = [{"role": "user", "content": f"{question} {INSTRUCTION}"}]
        if self.options.multi_turn or self.options.interaction:
            system = TOOL_SYSTEM_PROMPT if self.options.multi_turn else INTERACTION_SYSTEM_PROMPT
            messages.insert(0, {"role": "system", "content": system})
        return Prompt(messages=messages, answer=truth, id=prompt_id, meta={"index": index, "solution": solution})

    @hookimpl
    def tools(self) -> list[Tool]:
        """The calculator and the answer check in multi-turn mode, else none."""
        return [Calculator(), GSM8KAnswerCheck()] if self.options.multi_turn else []

    @hookimpl
    def interaction(self) -> Interaction | None:
        """verl's GSM8K interaction in interaction mode, else none."""
        return GSM8KInteraction() if self.options.interaction else None

    @hookimpl
    def score(self, batch: RolloutBatch) -> Scores:
        """Reward 1 for the right final number, else 0; info has `correct` and `format` (a `#### N`)."""
        return score_each(batch, self.reward)

    def reward(self, text: str, prompt: Prompt) -> dict[str, float]:
        """One response's reward; tool output in the text (multi-turn) is not read as the answer."""
        if self.options.multi_turn:
            text = without_tool_responses(text)
        expected = parse_number(str(prompt.answer))
        value = gsm8k_answer(text, self.options.extract)
        correct = float(value is not None and value == expected)
        return {"reward": correct, "correct": correct, "format": float(gsm8k_answer(text, "strict") is not None)}
