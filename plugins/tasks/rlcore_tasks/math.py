"""Competition math (MATH, MATH-500, AIME, DAPO-Math): the answer is read from the response's last
`\\boxed{}` (or DAPO's `Answer: X` line) and checked for mathematical equality with math-verify.

Rows are MATH-style (`problem` or `question`, plus `answer` or a `solution` whose last `\\boxed{}` is the
answer) or verl's parquet rows (`prompt` chat messages, `reward_model.ground_truth`), used unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from rlcore import Prompt, RolloutBatch, Scores, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.errors import DataError
from rlcore.scoring import score_each
from rlcore_tasks.answers import answer_line, last_boxed, last_tagged, latex_problem
from rlcore_tasks.datafiles import BAD_ROWS, BadRow, field, is_verl_row, load_split, to_prompts, verl_fields
from rlcore_tasks.equivalence import Checker, CheckTimeout

SPLITS = ("train", "test")
TEMPLATES = {
    "boxed": "{problem} Let's think step by step and output the final answer within \\boxed{{}}.",
    "dapo": ("Solve the following math problem step by step. The last line of your response should be of the "
             "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
             'Remember to put your answer on its own line after "Answer:".'),
    "tagged": ("{problem}\nPlease reason step by step and provide your answer between <answer> </answer> tags, for "
               "example <answer> 20\\sqrt{{3}} </answer>. Do not include an = sign."),
}
"""verl's MATH instruction, DAPO-Math-17k's prompt, and Megatron-LM's (examples/rl, `MathAgent` with
`answer_format="tagged"`)."""
EXTRACT = {"boxed": last_boxed, "dapo": answer_line, "tagged": last_tagged}
DAPO_INSTRUCTIONS = ("Solve the following math problem step by step. The last line of your response should be of the "
                     "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n",
                     '\n\nRemember to put your answer on its own line after "Answer:".')
"""What Megatron-LM's DAPO agent removes from DAPO-Math-17k's prompts before asking for a tagged answer."""
USED_FIELDS = ("problem", "question", "answer")


class Math:
    """Math problems with an equivalence-checked final answer: `dataset` reads the split's rows, `score`
    extracts the answer in the configured format and asks math-verify (in a worker with a timeout)."""

    @attrs.define
    class Options:
        path: str = "DigitalLearningGmbH/MATH-lighteval"
        """Where both splits are: a local directory (train / test files, jsonl or parquet) or a hub id."""
        subset: str = ""
        """The hub dataset's config name, if it has several; ignored for local files."""
        train_path: str = ""
        """A jsonl / parquet file (or directory, or hub id) holding the train split alone; overrides `path`."""
        test_path: str = ""
        """The same for the test split (e.g. MATH-500's or AIME 2024's test.jsonl)."""
        format: str = attrs.field(default="boxed", validator=check_choice(*TEMPLATES))
        """How the model is asked to answer and how the answer is read: the last `\\boxed{}` (`boxed`), DAPO's
        last `Answer: X` line (`dapo`), or Megatron-LM's `<answer> </answer>` tags ending the response
        (`tagged`; verl rows such as DAPO-Math-17k's lose DAPO's instruction first, as Megatron-LM's DAPO agent
        does)."""
        timeout_s: float = attrs.field(default=5.0, validator=check_range(0.01))
        """Seconds math-verify may spend on one answer; a check that takes longer scores 0 (`timeout`)."""
        bad_rows: str = attrs.field(default="error", validator=check_choice(*BAD_ROWS))
        """A row with a missing problem or answer: `error` stops with its file, index and field; `skip`
        leaves it out with a warning naming it."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.checker = Checker(options.timeout_s)

    @hookimpl
    def dataset(self, split: str) -> Sequence[Prompt]:
        """The split's problems, loaded through `datasets` and checked row by row."""
        if split not in SPLITS:
            raise DataError(f"math has no split {split!r}; splits: {', '.join(SPLITS)}")
        o = self.options
        rows, source = load_split(split, o.path, o.train_path if split == "train" else o.test_path, o.subset)
        return to_prompts(rows, lambda row, i: self.prompt(row, f"{split}-{i}", i), source, o.bad_rows)

    def prompt(self, row: Mapping[str, Any], prompt_id: str, index: int) -> Prompt:
        """One row as a Prompt whose answer is the reference answer's LaTeX; the row's other fields
        (subject, level, ...) go to `meta`."""
        if is_verl_row(row):
            messages, truth, rest = verl_fields(row)
            _check_reference(truth, "reward_model.ground_truth")
            if self.options.format == "tagged":  # Megatron-LM: the problem alone, then its own instruction
                problem = messages[-1]["content"]
                for instruction in DAPO_INSTRUCTIONS:
                    problem = problem.replace(instruction, "")
                messages = [*messages[:-1], {"role": "user", "content": TEMPLATES["tagged"].format(problem=problem)}]
            return Prompt(messages=messages, answer=truth, id=prompt_id, meta={"index": index, **rest})
        problem = row.get("problem") or row.get("question")
        if not problem:
            raise BadRow("missing field 'problem' (or 'question')")
        answer = row.get("answer")
        source = "answer"
        if answer is None or answer == "":
            answer, source = last_boxed(str(field(row, "solution"))), "solution"
            if answer is None:
                raise BadRow("no field 'answer', and no \\boxed{} answer in field 'solution'")
        _check_reference(str(answer), source)
        content = TEMPLATES[self.options.format].format(problem=problem)
        meta = {"index": index, **{k: v for k, v in row.items() if k not in USED_FIELDS}}
        return Prompt(messages=[{"role": "user", "content": content}], answer=str(answer), id=prompt_id, meta=meta)

    @hookimpl
    def score(self, batch: RolloutBatch) -> Scores:
        """Reward 1 for an answer equal to the reference, else 0; info has `correct`, `format` (an answer
        was found) and `timeout` (the check ran out of time)."""
        return score_each(batch, self.reward)

    def reward(self, text: str, prompt: Prompt) -> dict[str, float]:
        """One response's reward."""
        answer = EXTRACT[self.options.format](text)
        if answer is None:
            return {"reward": 0.0, "correct": 0.0, "format": 0.0, "timeout": 0.0}
        try:
            correct = float(self.checker(str(prompt.answer), answer))
        except CheckTimeout:
            return {"reward": 0.0, "correct": 0.0, "format": 1.0, "timeout": 1.0}
        return {"reward": correct, "correct": correct, "format": 1.0, "timeout": 0.0}

    @hookimpl
    def teardown(self) -> None:
        """Stop the math-verify worker."""
        self.checker.close()


def _check_reference(answer: str, source: str) -> None:
    """BadRow when a reference answer cannot be parsed, so no response could ever match it."""
    problem = latex_problem(answer)
    if problem is not None:
        raise BadRow(f"field '{source}': the reference answer {answer[:60]!r} cannot be parsed ({problem})")
