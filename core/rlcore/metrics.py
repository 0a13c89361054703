"""Where step metrics go: `metrics.jsonl` in the run directory and a live progress display."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

HEADLINE = (("reward/mean", "reward"), ("eval/pass@1", "pass@1"), ("response_length/mean", "len"),
            ("kl_ref", "kl"), ("approx_kl", "kl_old"), ("entropy", "ent"), ("loss", "loss"),
            ("timing/step", "s/step"))
"""What a progress line shows, when logged: `kl` is the KL to the reference model (algorithms with a KL
term), `kl_old` the policy's drift within the step's update (PPO's approx_kl)."""


def reduction(name: str) -> str:
    """How a metric combines over micro-batches, data-parallel ranks and optimizer steps: names ending in
    `_max` or `_min` by maximum or minimum, every other metric by sum (parts already divided by the
    whole mini-batch's counts, so their sum is the mini-batch's value)."""
    return "max" if name.endswith("_max") else "min" if name.endswith("_min") else "sum"


def combine(totals: dict[str, float], part: Mapping[str, float]) -> dict[str, float]:
    """Fold one part's metrics into `totals` (in place, and returned) as `reduction` says."""
    for name, value in part.items():
        value = float(value)
        if name not in totals:
            totals[name] = value
        else:
            kind = reduction(name)
            totals[name] = (max if kind == "max" else min if kind == "min" else float.__add__)(totals[name], value)
    return totals


def mean_over_steps(totals: Mapping[str, float], steps: int) -> dict[str, float]:
    """Per-step means of summed metrics over `steps` optimizer steps; maxima and minima stay as they are."""
    return {name: value if reduction(name) != "sum" else value / steps for name, value in totals.items()}


def mismatch_parts(trainer: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, tokens: float) -> dict[str, float]:
    """One part's share of the rollout-vs-trainer mismatch, for `combine` across micro-batches and ranks:
    sums divided by the whole batch's loss `tokens`, maxima, minima. `finish_mismatch` turns the combined
    shares into the `mismatch/*` metrics. Computed in float64 on w - 1, so that weights within 1e-7 of 1
    keep their spread."""
    diff = (trainer.detach().double() - rollout.detach().double())[mask > 0]
    dev = diff.expm1()  # the importance weight minus 1, exact near 0
    empty = diff.numel() == 0
    return {"mismatch/abs_diff_mean": float(diff.abs().sum()) / tokens,
            "mismatch/abs_diff_max": -math.inf if empty else float(diff.abs().max()),
            "mismatch/iw_mean": (diff.numel() + float(dev.sum())) / tokens,
            MISMATCH_DEV_SQ: float((dev * dev).sum()) / tokens,
            "mismatch/iw_min": math.inf if empty else 1.0 + float(dev.min()),
            "mismatch/iw_max": -math.inf if empty else 1.0 + float(dev.max())}


MISMATCH_DEV_SQ = "mismatch/iw_dev_sq_mean"
"""The mean of (w - 1)^2: a summable part that `finish_mismatch` turns into `mismatch/iw_std`."""


def finish_mismatch(metrics: dict[str, float]) -> dict[str, float]:
    """Turn combined `mismatch_parts` into the logged metrics (in place, and returned): `mismatch/iw_std`
    (population standard deviation) from the mean square, and no `mismatch/*` at all when no token was
    in the loss."""
    if MISMATCH_DEV_SQ not in metrics:
        return metrics
    dev_sq = metrics.pop(MISMATCH_DEV_SQ)
    if not math.isfinite(metrics["mismatch/abs_diff_max"]):
        for name in [n for n in metrics if n.startswith("mismatch/")]:
            del metrics[name]
        return metrics
    metrics["mismatch/iw_std"] = math.sqrt(max(dev_sq - (metrics["mismatch/iw_mean"] - 1.0) ** 2, 0.0))
    return metrics


def logprob_mismatch(trainer: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the rollout engine's logprobs of the sampled tokens are from the trainer's on the same weights.

    `mismatch/abs_diff_*` is |log pi_train - log pi_rollout| over the tokens in the loss, and `mismatch/iw_*`
    the token importance weight pi_train / pi_rollout (1 when the engines agree; TIS clips it).
    """
    tokens = float((mask > 0).sum())
    return finish_mismatch(mismatch_parts(trainer, rollout, mask, max(tokens, 1.0)))


class MetricsLog:
    """Appends one JSON object per step; on resume keeps only the rows up to the resumed step."""

    def __init__(self, path: Path, keep_until: int | None = None) -> None:
        self.path = path
        if keep_until is not None and path.exists():
            rows = [r for r in self.read(path) if r.get("step", 0) <= keep_until]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(path)
        elif keep_until is None and path.exists():
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """Rows of a metrics.jsonl (a torn last line from a kill is ignored)."""
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


def headline(metrics: dict[str, Any]) -> str:
    """The key numbers of a step, short enough for one line."""
    parts = []
    for key, label in HEADLINE:
        v = metrics.get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{label} {v:.3g}")
    return "  ".join(parts)


def clock(seconds: float) -> str:
    """`3725.2` -> `1:02:05`."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressDisplay:
    """A rich progress bar on a terminal (elapsed, remaining, the headline numbers); a plain line every
    `log_every` steps otherwise (CI, log files): step, percent, headline, elapsed and ETA. The ETA is the
    mean time per step since this process started (or resumed) times the steps left."""

    def __init__(self, total: int, start: int, log_every: int, console: Console | None = None) -> None:
        self.console = console or Console()
        self.total = total
        self.start = start
        self.log_every = log_every
        self.started = time.monotonic()
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                                     TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(),
                                     TextColumn("{task.description}"), console=self.console)
            self.task = self.progress.add_task("", total=total, completed=start)
            self.progress.start()

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=headline(metrics))
        elif step % self.log_every == 0 or step == self.total or step == self.start + 1:
            print(self.line(step, metrics), file=self.console.file, flush=True)

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        """One plain progress line."""
        elapsed = time.monotonic() - self.started
        eta = (self.total - step) * elapsed / max(step - self.start, 1)
        percent = 100 * step / max(self.total, 1)
        return (f"step {step}/{self.total} ({percent:.0f}%)  {headline(metrics)}  "
                f"elapsed {clock(elapsed)}  eta {clock(eta)}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
