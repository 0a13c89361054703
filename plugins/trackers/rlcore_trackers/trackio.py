"""Trackio (Hugging Face's local-first tracker, TRL's `report_to="trackio"`): runs go to Trackio's own store
(`$TRACKIO_DIR`, by default `~/.cache/huggingface/trackio`); `trackio show --project rlcore` opens them."""

from __future__ import annotations

from typing import Any

import attrs

from rlcore_trackers.common import Tracker


class TrackioTracker(Tracker):
    """A Trackio run named after the run directory, with the config, metrics and `trackio.Table`s."""

    name = "trackio"
    package = "trackio"

    @attrs.define
    class Options:
        project: str = "rlcore"

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.run: Any = None

    def location(self) -> str:
        from trackio.utils import TRACKIO_DIR

        return f"{TRACKIO_DIR} (project {self.options.project})"

    def open(self, run_id: str | None, resume_step: int) -> str:
        import trackio

        name = run_id or self._free_name(trackio)
        self.run = trackio.init(project=self.options.project, name=name, config=self.config,
                                resume="must" if run_id else "never", embed=False,
                                auto_log_gpu=False, auto_log_cpu=False)
        return name

    def _free_name(self, trackio: Any) -> str:
        """The run directory's name, with a suffix if the project already has a run of that name (Trackio
        resumes by name)."""
        try:
            taken = {run.name for run in trackio.Api().runs(self.options.project)}
        except Exception:  # noqa: BLE001 - a project that does not exist yet has no runs
            taken = set()
        name, n = self.run_dir.name, 1
        while name in taken:
            n += 1
            name = f"{self.run_dir.name}-{n}"
        return name

    def write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def write_table(self, step: int, split: str, columns: list[str], data: list[list[Any]]) -> None:
        import trackio

        self.run.log({f"generations/{split}": trackio.Table(columns=columns, data=data)}, step=step)

    def close(self, finished: bool) -> None:
        self.run.finish()
