"""Generation tables: a few of a step's samples (prompt, response, reward, finish reason, tool calls, the
task's score details), so a person can catch reward hacking and format collapse while a run trains.

Every `trainer.generations_every` steps and after every evaluation, `GenerationLog` appends one JSON
object per sample to `generations.jsonl` in the run directory and calls the `log_generations` hook, which
experiment trackers implement. Samples are spread evenly over the batch (no random draw, so logging
never changes a run).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlcore.metrics import MetricsLog
from rlcore.types import Prompt, RolloutBatch, Scores

FILE = "generations.jsonl"
COLUMNS = ("step", "split", "prompt", "response", "reward", "finish_reason", "tool_calls")
"""The leading columns of every table; the task's score details follow, in sorted order."""


def prompt_text(prompt: Prompt) -> str:
    """The prompt's chat messages as `role: text` lines (images shown as `<image>`)."""
    lines = []
    for message in prompt.messages:
        content = message.get("content", "")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") if part.get("type") == "text" else f"<{part.get('type')}>"
                               for part in content if isinstance(part, dict))
        lines.append(f"{message.get('role', '?')}: {content}")
    return "\n".join(lines)


def pick(size: int, samples: int) -> list[int]:
    """`samples` indices spread evenly over `size` samples (all of them if there are fewer)."""
    if size <= samples:
        return list(range(size))
    return [i * size // samples for i in range(samples)]


def rows_of(batch: RolloutBatch, step: int, split: str, samples: int, rewards: Any = None,
            info: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Table rows for `samples` of `batch`'s responses; `rewards` (default `batch.rewards`) and `info`
    (default `batch.info`: per-sample finish reason, tool calls and score details) may come from elsewhere."""
    details = info if info is not None else batch.info
    rewards = rewards if rewards is not None else batch.rewards
    rows = []
    for i in pick(len(batch), samples):
        extra = dict(details[i]) if i < len(details) else {}
        finish = extra.pop("finish_reason", None)
        if finish is None:
            finish = "length" if bool(batch.truncated[i]) else "stop"
        rows.append({"step": step, "split": split, "prompt": prompt_text(batch.prompts[i]),
                     "response": batch.texts[i],
                     "reward": float(rewards[i]) if rewards is not None else None,
                     "finish_reason": finish, "tool_calls": extra.pop("tool_calls", None),
                     **{k: v for k, v in sorted(extra.items()) if isinstance(v, (int, float, str, bool))}})
    return rows


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Rows as (columns, data) for a tracker's table type: `COLUMNS` first, then every other key in order of
    first appearance; a key a row lacks is None."""
    columns = list(COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns, [[row.get(c) for c in columns] for row in rows]


def read(run_dir: Path) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """The tables of a run directory's `generations.jsonl`, by (step, split), in step order."""
    path = Path(run_dir) / FILE
    tables: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in MetricsLog.read(path) if path.exists() else []:
        tables[(int(row.get("step", 0)), str(row.get("split", "train")))].append(row)
    return dict(sorted(tables.items()))


class GenerationLog:
    """Writes the run's generation tables to `generations.jsonl` and the `log_generations` hook."""

    def __init__(self, run_dir: Path, hook: Any, every: int, samples: int, keep_until: int | None = None) -> None:
        self.hook = hook
        self.every = every
        self.samples = samples
        self.file = MetricsLog(Path(run_dir) / FILE, keep_until=keep_until)

    def train(self, step: int, batch: RolloutBatch | None) -> None:
        """Log samples of a training step's batch when `step` is a multiple of `every`."""
        if batch is not None and self.every and step % self.every == 0:
            self._log(step, "train", rows_of(batch, step, "train", self.samples))

    def evaluation(self, step: int) -> Callable[[RolloutBatch, Scores], None]:
        """A callback for `evaluate(..., on_batch=...)` that logs samples of the first evaluated batch."""
        done = not self.every

        def on_batch(batch: RolloutBatch, scores: Scores) -> None:
            nonlocal done
            if done:
                return
            done = True
            merged = [{**a, **b} for a, b in zip(batch.info or [{}] * len(batch), scores.info or [{}] * len(batch))]
            self._log(step, "eval", rows_of(batch, step, "eval", self.samples, scores.rewards, merged))

        return on_batch

    def _log(self, step: int, split: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.file.write(row)
        self.hook.log_generations(step=step, split=split, rows=rows)
