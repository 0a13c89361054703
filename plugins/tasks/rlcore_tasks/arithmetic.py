"""The embedded default task: seeded arithmetic problems with an exact-answer reward.

The compact style ("3+4=" -> "7") fits the embedded tiny model's alphabet `0123456789+-*=`, so a
random-init model already hits the answer now and then and GRPO has signal from the first step; the
instruct style asks a chat model in words ("What is 3 + 4? Answer with just the number.").

With `calculator` the task offers a calculator tool (multi-turn) and reads the answer from the last
assistant turn; its `demonstrations` (for `rlcore warmstart`) solve a share of the problems with the
tool and answer the rest directly, so a warm-started model calls the tool that often before RL.
"""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Sequence
from typing import Any, overload

import attrs

from rlcore import Prompt, RolloutBatch, Scores, Tool, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.errors import DataError
from rlcore.scoring import score_each
from rlcore_tasks import procedural
from rlcore_tasks.answers import final_turns
from rlcore_tasks.tools import Calculator, calculate

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
SPLITS = ("train", "test")
NUMBER = re.compile(r"(?:(?<!\d)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
"""An integer or decimal, optionally comma-grouped; a '-' counts as a sign only when no digit precedes it
(so "5-3" reads as 5 and 3, "= -3" as -3)."""


def parse_number(text: str) -> float:
    """The value of one NUMBER match ("1,234" -> 1234.0)."""
    return float(text.replace(",", ""))


def extract(text: str, mode: str) -> float | None:
    """The number a response answers with: the whole stripped text (`strict`), or its `first` or
    `last` number; None when there is none."""
    if mode == "strict":
        return parse_number(text.strip()) if NUMBER.fullmatch(text.strip()) else None
    found = NUMBER.findall(text)
    if not found:
        return None
    return parse_number(found[0] if mode == "first" else found[-1])


class Problems(procedural.Problems):
    """A lazy split: problem i is generated on access from (seed, split, i), never stored."""

    task = "arithmetic"

    def make(self, i: int) -> Prompt:
        """Problem i: operands and operator drawn from a generator seeded by (seed, split, i)."""
        o = self.options
        rng = random.Random(f"arithmetic:{o.seed}:{self.split}:{i}")
        a, b = rng.randint(o.min_operand, o.max_operand), rng.randint(o.min_operand, o.max_operand)
        op = rng.choice(o.ops)
        content = f"{a}{op}{b}=" if o.style == "compact" else f"What is {a} {op} {b}? Answer with just the number."
        return Prompt(messages=[{"role": "user", "content": content}], answer=str(OPS[op](a, b)),
                      id=f"{self.split}-{i}", meta={"operands": [a, b], "op": op})


class Demonstrations(Sequence[list[dict[str, Any]]]):
    """A split's worked conversations, one per problem, generated on access: a calculator call, its answer
    and the result (with probability `demo_tool_rate` when the calculator is offered), else the answer."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    @overload
    def __getitem__(self, index: int) -> list[dict[str, Any]]: ...
    @overload
    def __getitem__(self, index: slice) -> list[list[dict[str, Any]]]: ...
    def __getitem__(self, index: int | slice) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        prompt = self.problems[index]
        o = self.problems.options
        rng = random.Random(f"arithmetic-demonstration:{o.seed}:{self.problems.split}:{prompt.id}")
        if not (o.calculator and rng.random() < o.demo_tool_rate):
            return prompt.messages + [{"role": "assistant", "content": prompt.answer}]
        a, b = prompt.meta["operands"]
        expression = f"{a}{prompt.meta['op']}{b}"
        call = {"type": "function", "function": {"name": Calculator.name, "arguments": {"expression": expression}}}
        return prompt.messages + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                  {"role": "tool", "content": calculate(expression)},
                                  {"role": "assistant", "content": prompt.answer}]


class Arithmetic:
    """Procedural arithmetic: `dataset` yields lazy seeded problems, `score` checks the exact answer."""

    @attrs.define
    class Options:
        min_operand: int = attrs.field(default=0, validator=check_range(0))
        """Smallest operand."""
        max_operand: int = attrs.field(default=9, validator=check_range(0))
        """Largest operand (at least `min_operand`)."""
        ops: str = attrs.field(default="+", validator=[attrs.validators.min_len(1),
                                                        attrs.validators.deep_iterable(check_choice(*OPS))])
        """Operators drawn uniformly, as one string of any of + - * (e.g. "+-*")."""
        style: str = attrs.field(default="compact", validator=check_choice("compact", "instruct"))
        """`compact`: "3+4=" (the tiny model's alphabet); `instruct`: a question in words for chat models."""
        extract: str = attrs.field(default="last", validator=check_choice("strict", "first", "last"))
        """How the answer is read: the whole stripped response (`strict`), or its `first` or `last` number."""
        train_size: int = attrs.field(default=100_000, validator=check_range(1))
        """Problems in the train split (generated on access)."""
        test_size: int = attrs.field(default=500, validator=check_range(1))
        """Problems in the test split."""
        seed: int = 0
        """Seed of the problem set (independent of the training seed)."""
        format_reward: float = attrs.field(default=0.0, validator=check_range(0.0))
        """Extra reward for a response that is only a number."""
        calculator: bool = False
        """Offer a calculator tool (multi-turn rollouts); the answer is read from the last assistant turn."""
        demo_tool_rate: float = attrs.field(default=1.0, validator=check_range(0.0, 1.0))
        """With `calculator`: the share of the warm-start demonstrations that use it (the rest answer directly)."""

        def __attrs_post_init__(self) -> None:
            if self.max_operand < self.min_operand:
                raise ValueError(f"max_operand={self.max_operand} must be at least min_operand={self.min_operand}")

    def __init__(self, options: Options) -> None:
        self.options = options

    @hookimpl
    def dataset(self, split: str) -> Sequence[Prompt]:
        """The train or test problems, generated lazily."""
        if split not in SPLITS:
            raise DataError(f"arithmetic has no split {split!r}; splits: {', '.join(SPLITS)}")
        size = self.options.train_size if split == "train" else self.options.test_size
        return Problems(self.options, split, size)

    @hookimpl
    def tools(self) -> list[Tool]:
        """The calculator when `calculator` is on, else none (single-turn)."""
        return [Calculator()] if self.options.calculator else []

    @hookimpl
    def demonstrations(self, split: str) -> Sequence[list[dict[str, Any]]]:
        """Worked conversations for `rlcore warmstart`, one per problem of the split."""
        problems = self.dataset(split)
        return Demonstrations(problems)

    @hookimpl
    def score(self, batch: RolloutBatch) -> Scores:
        """Reward = correct (+ format_reward when the response is only a number); with the calculator, of the
        last assistant turn."""
        if self.options.calculator:
            batch = attrs.evolve(batch, texts=final_turns(batch.texts, batch.info))
        return score_each(batch, self.reward)

    def reward(self, text: str, prompt: Prompt) -> dict[str, Any]:
        """One response's reward with its `correct` and `format` flags; a malformed answer raises."""
        expected = int(str(prompt.answer))
        value = extract(text, self.options.extract)
        correct = float(value is not None and value == expected)
        fmt = float(extract(text, "strict") is not None)
        return {"reward": correct + self.options.format_reward * fmt, "correct": correct, "format": fmt}
