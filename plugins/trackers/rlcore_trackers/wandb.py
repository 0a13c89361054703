"""Weights & Biases: offline by default (the run is written under `<run_dir>/wandb`; `wandb sync` uploads
it later), online when asked and logged in."""

from __future__ import annotations

import os
from typing import Any, Literal

import attrs

from rlcore.config import check_choice
from rlcore_trackers.common import Tracker

STEP = "trainer/step"
"""The x-axis of every chart: the loop's step, not wandb's own counter, so the steps redone after a
resume are kept (wandb drops a step below its counter)."""


class WandbTracker(Tracker):
    """`wandb.init` with the resolved config; metrics and `wandb.Table`s against `trainer/step`."""

    name = "wandb"
    package = "wandb"

    @attrs.define
    class Options:
        project: str = "rlcore"
        entity: str = ""
        """Team or user; empty: wandb's default."""
        mode: Literal["offline", "online"] = attrs.field(default="offline", validator=check_choice("offline", "online"))
        """offline: no network, files under `<run_dir>/wandb`; online: needs `wandb login` or WANDB_API_KEY."""
        tags: list[str] = attrs.field(factory=list)

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.run: Any = None

    def location(self) -> str:
        return str(self.run_dir / "wandb") if self.options.mode == "offline" else f"wandb project {self.options.project}"

    def open(self, run_id: str | None, resume_step: int) -> str:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        o = self.options
        self.run = wandb.init(project=o.project, entity=o.entity or None, mode=o.mode, dir=str(self.run_dir),
                              name=self.run_dir.name, id=run_id, resume="allow" if run_id else None,
                              config=self.config, tags=o.tags or None,
                              settings=wandb.Settings(console="off"))
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        return self.run.id

    def write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({STEP: step, **metrics})

    def write_table(self, step: int, split: str, columns: list[str], data: list[list[Any]]) -> None:
        import wandb

        self.run.log({STEP: step, f"generations/{split}": wandb.Table(columns=columns, data=data)})

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
