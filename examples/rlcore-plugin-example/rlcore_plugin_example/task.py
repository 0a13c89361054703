"""The example task `echo`: copy a digit string ("4821=" -> "4821").

Published through the `rlcore.task` entry point in pyproject.toml; `rlcore run --task echo` selects it.
"""

from __future__ import annotations

import random

import attrs

from rlcore import Prompt, RolloutBatch, Scores, hookimpl
from rlcore.config import check_range
from rlcore.errors import DataError
from rlcore.scoring import score_each

SIZES = {"train": 10_000, "test": 100}


def echo_reward(text: str, prompt: Prompt) -> dict[str, float]:
    """The fraction of positions where the response repeats the digits (exact copy = 1.0);
    extra characters count against it, so only the exact copy scores 1."""
    response, target = text.strip(), prompt.answer
    matches = sum(r == t for r, t in zip(response, target))
    return {"reward": matches / max(len(response), len(target)), "exact": float(response == target)}


class EchoTask:
    """Echo: the prompt is `length` random digits followed by '=', the answer those digits."""

    @attrs.define
    class Options:
        length: int = attrs.field(default=4, validator=check_range(1, 64))
        """Digits per prompt (keep `sampling.max_new_tokens` at least this)."""
        seed: int = 0
        """Seed of the generated problems."""

    def __init__(self, options: Options) -> None:
        self.options = options

    @hookimpl
    def dataset(self, split: str) -> list[Prompt]:
        """A seeded list of digit strings per split (train 10,000, test 100)."""
        if split not in SIZES:
            raise DataError(f"echo has no split {split!r}; splits: {', '.join(SIZES)}")
        rng = random.Random(f"echo:{self.options.seed}:{split}")
        digits = ["".join(rng.choices("0123456789", k=self.options.length)) for _ in range(SIZES[split])]
        return [Prompt(messages=[{"role": "user", "content": f"{d}="}], answer=d, id=f"{split}-{i}")
                for i, d in enumerate(digits)]

    @hookimpl
    def score(self, batch: RolloutBatch) -> Scores:
        """Per-sample `echo_reward`; a sample whose scoring raises gets 0 and is counted."""
        return score_each(batch, echo_reward)
