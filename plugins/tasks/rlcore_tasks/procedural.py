"""Lazy splits of procedurally generated problems: problem i is made on access from (seed, split, i), never stored,
so a task may offer a hundred thousand problems at no cost (arithmetic, colors)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, overload

from rlcore import Prompt


class Problems(Sequence[Prompt]):
    """`size` problems of one split; subclasses make problem i in `make` from (options, split, i)."""

    task = "procedural"
    """The task's name, for errors."""

    def __init__(self, options: Any, split: str, size: int) -> None:
        self.options, self.split, self.size = options, split, size

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, index: int) -> Prompt: ...
    @overload
    def __getitem__(self, index: slice) -> list[Prompt]: ...
    def __getitem__(self, index: int | slice) -> Prompt | list[Prompt]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        i = operator.index(index)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"{self.task} {self.split} index {index} out of range for {self.size} problems")
        return self.make(i)

    def make(self, i: int) -> Prompt:
        raise NotImplementedError
