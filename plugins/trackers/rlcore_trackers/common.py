"""What every tracker shares: when a library's run is opened, resumed and closed, what it is sent, and
where its id is kept.

A fresh run opens the library's run in `setup` with the resolved config. A resumed run waits for
`load_state`, which hands over the run id and the step its checkpoint holds, and reopens that run (a
tracker newly added on resume opens a fresh one at its first log). The id also goes to
`<run_dir>/trackers/<name>.json`, so a person (and `rlcore report`) can find the run.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from rlcore import hookimpl
from rlcore.context import RunContext
from rlcore.errors import ConfigError
from rlcore.generations import table

STATE_FILE = "tracker.json"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"trainer": {"steps": 3}}` -> `{"trainer.steps": 3}` (for trackers whose parameters are flat)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of a step, without the step itself."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """Base of the tracker plugins: the hook implementations; subclasses talk to their library."""

    name = ""
    package = ""
    """The module the library installs; checked when the plugin is built, before any setup."""

    def __init__(self, options: Any = None) -> None:
        self.options = options
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(f"tracker {self.name} needs the {self.package} package: "
                              f"pip install 'rlcore-trackers[{self.name}]', or drop {self.name} from trainer.log_to")
        self.ctx: RunContext | None = None
        self.run_id: str | None = None
        self.step = 0

    # ---- hooks ---------------------------------------------------------------------------------

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Open a fresh run now; a resumed one waits for `load_state` to name it."""
        self.ctx = ctx
        if not ctx.resumed:
            self._start(None, 0)

    @hookimpl
    def load_state(self, directory: Path) -> None:
        """Reopen the run the checkpoint names, at the checkpoint's step."""
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        self._start(state["run_id"], int(state["step"]))

    @hookimpl
    def save_state(self, directory: Path) -> None:
        """The run id and the last step logged, so `--resume` continues the same run."""
        self._ensure_open()
        (Path(directory) / STATE_FILE).write_text(json.dumps({"run_id": self.run_id, "step": self.step}))

    @hookimpl
    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self._ensure_open()
        self.write_metrics(step, numbers(metrics))
        self.step = step

    @hookimpl
    def log_generations(self, step: int, split: str, rows: list[dict[str, Any]]) -> None:
        self._ensure_open()
        columns, data = table(rows)
        self.write_table(step, split, columns, data)

    @hookimpl
    def teardown(self) -> None:
        """Close the library's run: finished when the run reached `trainer.steps`, else failed."""
        if self.run_id is not None:
            steps = int(((self.ctx.config if self.ctx else {}).get("trainer") or {}).get("steps", 0))
            self.close(finished=self.step >= steps)
            self.run_id = None

    # ---- what subclasses implement ---------------------------------------------------------------

    def open(self, run_id: str | None, resume_step: int) -> str:
        """Open (or, with `run_id`, resume after `resume_step`) the library's run; return its id."""
        raise NotImplementedError

    def write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def write_table(self, step: int, split: str, columns: list[str], data: list[list[Any]]) -> None:
        raise NotImplementedError

    def close(self, finished: bool) -> None:
        raise NotImplementedError

    def location(self) -> str:
        """Where the library keeps the run (a directory, a tracking URI, a project)."""
        raise NotImplementedError

    # ---- helpers --------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        assert self.ctx is not None, "setup has not run"
        return Path(self.ctx.run_dir).resolve()

    @property
    def config(self) -> dict[str, Any]:
        return self.ctx.config if self.ctx is not None else {}

    def _start(self, run_id: str | None, step: int) -> None:
        self.step = step
        self.run_id = self.open(run_id, step)
        record = self.run_dir / "trackers" / f"{self.name}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"tracker": self.name, "run_id": self.run_id, "location": self.location()},
                                     indent=2) + "\n")

    def _ensure_open(self) -> None:
        if self.run_id is None:
            self._start(None, self.step)
