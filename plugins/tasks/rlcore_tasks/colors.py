"""A synthetic vision task whose answer is visible only in the image: which colour fills the square.

Problem i is drawn from (seed, split, i): a square of one of the `colors` (each channel jittered) at a random
place and size on a random grey background. Every prompt has the same text, naming the colours with letters,
so a policy blind to the image scores at best 1/len(colors) on balanced problems; anything above that is read
from the pixels. Reward 1 when the first choice letter in the response names the square's colour. A random
tiny vision-language model writes a choice letter now and then, so GRPO has a varied reward from the first
step: this is the image path's learning check (`rlcore run --task colors --model embedded:qwen2.5-vl`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import attrs

from rlcore import Prompt, RolloutBatch, Scores, hookimpl
from rlcore.config import check_range
from rlcore.errors import DataError
from rlcore.scoring import score_each
from rlcore_tasks import procedural
from rlcore_tasks.images import needs_vision_model

PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190), "orange": (240, 140, 30), "cyan": (40, 200, 210), "black": (20, 20, 20)}
"""RGB of every colour the task can draw."""
SPLITS = ("train", "test")
LETTERS = "ABCDEFGH"


def _colors(value: list[str]) -> list[str]:
    unknown = [c for c in value if c not in PALETTE]
    if unknown or not 2 <= len(value) <= len(LETTERS) or len(set(value)) != len(value):
        raise ValueError(f"colors must be 2 to {len(LETTERS)} distinct names of {', '.join(PALETTE)}; got {value}")
    return list(value)


class Problems(procedural.Problems):
    """A lazy split: problem i (its image drawn on access) from a generator seeded by (seed, split, i)."""

    task = "colors"

    def make(self, i: int) -> Prompt:
        from PIL import Image, ImageDraw

        o = self.options
        rng = random.Random(f"colors:{o.seed}:{self.split}:{i}")
        k = rng.randrange(len(o.colors))
        grey = rng.randint(90, 170)
        image = Image.new("RGB", (o.image_size, o.image_size), (grey, grey, grey))
        side = rng.randint(o.image_size * 2 // 5, o.image_size * 9 // 10)
        x, y = rng.randint(0, o.image_size - side), rng.randint(0, o.image_size - side)
        fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in PALETTE[o.colors[k]])
        ImageDraw.Draw(image).rectangle([x, y, x + side - 1, y + side - 1], fill=fill)
        choices = ", ".join(f"{LETTERS[j]} {name}" for j, name in enumerate(o.colors))
        text = f"Colour of the square? {choices}."
        return Prompt(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                      answer=LETTERS[k], id=f"{self.split}-{i}", images=[image], meta={"color": o.colors[k]})


class Colors:
    """Which colour is the square: a synthetic image task with a varied reward for a random VL model."""

    @attrs.define
    class Options:
        colors: list[str] = attrs.field(factory=lambda: ["red", "green", "blue", "yellow"], converter=_colors)
        """The colours a square may have (2 to 8 of red, green, blue, yellow, purple, orange, cyan, black),
        offered as choices A, B, C, ... in this order."""
        image_size: int = attrs.field(default=56, validator=check_range(28, 1024))
        """Side of the square images in pixels (56: 2 x 2 merged patches, 4 image tokens, for Qwen2-VL models)."""
        train_size: int = attrs.field(default=100000, validator=check_range(1))
        test_size: int = attrs.field(default=256, validator=check_range(1))
        seed: int = 0

    def __init__(self, options: Options) -> None:
        self.options = options
        letters = LETTERS[:len(options.colors)]
        self.choice = re.compile(f"[{letters}]")

    @hookimpl
    def modalities(self) -> list[str]:
        return ["image"]

    @hookimpl
    def check_run(self, model_config: Any) -> list[str]:
        """Refuse a text-only model: the answer is in the image."""
        return needs_vision_model("colors", model_config)

    @hookimpl
    def dataset(self, split: str) -> Sequence[Prompt]:
        if split not in SPLITS:
            raise DataError(f"colors has no split {split!r}; splits: {', '.join(SPLITS)}")
        return Problems(self.options, split, self.options.train_size if split == "train" else self.options.test_size)

    @hookimpl
    def score(self, batch: RolloutBatch) -> Scores:
        """1 when the response's first choice letter is the square's colour; `score/correct` and
        `score/answered` (a choice letter was written) are logged."""
        return score_each(batch, self.reward)

    def reward(self, text: str, prompt: Prompt) -> dict[str, float]:
        found = self.choice.search(text)
        correct = float(found is not None and found.group() == prompt.answer)
        return {"reward": correct, "correct": correct, "answered": float(found is not None)}
