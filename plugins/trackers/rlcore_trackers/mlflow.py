"""MLflow: by default a SQLite store in `<run_dir>/mlflow.db` with artifacts beside it (MLflow's local
store; its plain-file store is deprecated); any tracking URI (a server) when set. Read it with
`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db` (the full `mlflow` package) or `MlflowClient`."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from rlcore_trackers.common import Tracker, flatten

BATCH = 100
"""Metrics or params per `log_batch` call (MLflow's per-request limits are 1000 metrics and 100 params)."""


def metric_name(key: str) -> str:
    """An MLflow-valid metric name (letters, digits, `_ - . / :` and spaces): `eval/pass@1` -> `eval/pass_at_1`."""
    return re.sub(r"[^\w\-./: ]", "_", key.replace("@", "_at_"))


@contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's own deprecation warnings (SQLAlchemy, pandas) and INFO lines are not the run's business."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class MLflowTracker(Tracker):
    """An MLflow run with the config as params and `config.yaml`, metrics by step, and generation tables
    as `generations/<split>_step_NNNNNN.json` (`mlflow.load_table` reads them)."""

    name = "mlflow"
    package = "mlflow"

    @attrs.define
    class Options:
        tracking_uri: str = ""
        """Empty: $MLFLOW_TRACKING_URI if set, else `sqlite:///<run_dir>/mlflow.db`."""
        experiment: str = "rlcore"

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.client: Any = None

    def location(self) -> str:
        return (self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{self.run_dir / 'mlflow.db'}")

    def open(self, run_id: str | None, resume_step: int) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        with _quiet():
            self.client = MlflowClient(tracking_uri=self.location())
            if run_id is not None:  # params are immutable in MLflow: a resumed run's config is config.yaml
                self.client.update_run(run_id, status="RUNNING")
                self.client.log_dict(run_id, self.config, "config.yaml")
                return run_id
            experiment = self.client.get_experiment_by_name(self.options.experiment)
            local = self.location().startswith("sqlite:///") and not self.options.tracking_uri
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                self.options.experiment, artifact_location=(self.run_dir / "mlflow-artifacts").as_uri() if local else None)
            run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                            tags={"rlcore.run_dir": str(self.run_dir)}).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(self.config).items()]
            for i in range(0, len(params), BATCH):
                self.client.log_batch(run_id, params=params[i:i + BATCH])
            self.client.log_dict(run_id, self.config, "config.yaml")
        return run_id

    def write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(metric_name(key), value, now, step) for key, value in metrics.items()]
        with _quiet():
            for i in range(0, len(rows), BATCH):
                self.client.log_batch(self.run_id, metrics=rows[i:i + BATCH])

    def write_table(self, step: int, split: str, columns: list[str], data: list[list[Any]]) -> None:
        with _quiet():
            self.client.log_table(self.run_id, data={c: [row[i] for row in data] for i, c in enumerate(columns)},
                                  artifact_file=f"generations/{split}_step_{step:06d}.json")

    def close(self, finished: bool) -> None:
        with _quiet():
            self.client.set_terminated(self.run_id, status="FINISHED" if finished else "FAILED")
