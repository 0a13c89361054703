"""Turning a per-sample reward function into a task's `score` hook, safely."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from rlcore.errors import TrainingError
from rlcore.types import Prompt, RolloutBatch, Scores

log = logging.getLogger("rlcore.scoring")

RewardFn = Callable[[str, Prompt], "float | dict[str, float]"]


def score_each(batch: RolloutBatch, fn: RewardFn) -> Scores:
    """Score every response with `fn(text, prompt)`.

    `fn` returns a reward, or a dict with a `reward` key plus other numbers to log. A call that raises
    scores 0 with `reward_error=1` and every other info key of the batch at 0 (logged as
    `score/reward_error`), so one bad sample never stops the run; the first error of a batch is logged.
    """
    rewards: list[float] = []
    infos: list[dict[str, float]] = []
    first_error: str | None = None
    for i, (text, prompt) in enumerate(zip(batch.texts, batch.prompts)):
        try:
            out: Any = fn(text, prompt)
            if isinstance(out, dict):
                info = {k: float(v) for k, v in out.items()}
                reward = info.pop("reward")
            else:
                info, reward = {}, float(out)
            info["reward_error"] = 0.0
        except Exception as e:  # noqa: BLE001 - a reward function's failure scores 0 and is counted
            if first_error is None:
                first_error = f"sample {i} (prompt id {prompt.id!r}): {type(e).__name__}: {e}"
            reward, info = 0.0, {"reward_error": 1.0}
        rewards.append(reward)
        infos.append(info)
    if first_error is not None:
        keys = {k for info in infos for k in info}
        for info in infos:
            if info["reward_error"]:
                info.update({k: 0.0 for k in keys if k not in info})  # so `score/correct` counts it as wrong
        n = sum(int(x["reward_error"]) for x in infos)
        log.warning("reward function raised on %d of %d samples; first: %s", n, len(infos), first_error)
    return Scores(rewards=torch.tensor(rewards, dtype=torch.float32), info=infos)


def check_finite(rewards: torch.Tensor, prompts: list[Prompt], task: str, where: str) -> None:
    """Stop with an error naming the task when any reward is NaN or infinite: such a reward would turn every
    advantage of its group into NaN, and the run would learn nothing while looking alive."""
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        first = prompts[i].id if i < len(prompts) else "?"
        raise TrainingError(f"{where}: task {task!r} returned {int(bad.sum())} non-finite rewards of {len(rewards)} "
                            f"(first: {float(rewards[i])} for prompt {first!r}); a reward must be a finite number: "
                            "fix the task's reward function")
