"""TensorBoard: scalars, the config and generation tables as text, in `<run_dir>/tensorboard` (read it with
`tensorboard --logdir RUN_DIR/tensorboard`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import yaml

from rlcore_trackers.common import Tracker


def markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    """A Markdown table (TensorBoard's text plugin renders Markdown); cell text keeps its line breaks."""
    def cell(value: Any) -> str:
        text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


class TensorBoardTracker(Tracker):
    """Writes events with `torch.utils.tensorboard.SummaryWriter`; a resume purges what was logged after the
    checkpoint, so the curves hold each step once."""

    name = "tensorboard"
    package = "tensorboard"

    @attrs.define
    class Options:
        log_dir: str = ""
        """Event directory; empty: `<run_dir>/tensorboard`."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.writer: Any = None

    def location(self) -> str:
        return str(Path(self.options.log_dir) if self.options.log_dir else self.run_dir / "tensorboard")

    def open(self, run_id: str | None, resume_step: int) -> str:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.location(), purge_step=resume_step + 1 if run_id else None)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(self.config, sort_keys=False) + "```", resume_step)
        return run_id or self.location()

    def write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def write_table(self, step: int, split: str, columns: list[str], data: list[list[Any]]) -> None:
        self.writer.add_text(f"generations/{split}", markdown_table(columns, data), step)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()
