"""Feeding prompts to the loop: seeded shuffled epochs over a task's dataset, with a resumable position."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlcore.errors import DataError
from rlcore.types import Prompt


class PromptStream:
    """Yields prompts in a fresh seeded permutation each epoch; `state()` records where it stands.

    `admit`, if given, sees each prompt as it is drawn: False skips it, or it raises to stop the run (a
    generated dataset's context-length check, which cannot run over the whole split beforehand)."""

    def __init__(self, dataset: Sequence[Prompt], seed: int, admit: Callable[[Prompt], bool] | None = None) -> None:
        if len(dataset) == 0:
            raise DataError("the task's train split is empty: check the task's data path or options")
        self.dataset = dataset
        self.seed = seed
        self.admit = admit
        self.epoch = 0
        self.pos = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def take(self, count: int) -> list[Prompt]:
        """The next `count` prompts, wrapping into a new epoch when the current one ends."""
        out: list[Prompt] = []
        skipped = 0
        while len(out) < count:
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._permutation(self.epoch)
            index = self._order[self.pos]
            self.pos += 1
            prompt = self.dataset[index]
            if not isinstance(prompt, Prompt):
                raise DataError(f"train row {index}: the task returned {type(prompt).__name__}, not a Prompt")
            if self.admit is not None and not self.admit(prompt):
                skipped += 1
                if skipped > len(self.dataset):
                    raise DataError("no prompt of the train split is admitted (every one was left out)")
                continue
            out.append(prompt)
        return out

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)
