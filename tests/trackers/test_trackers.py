"""Tracker plugins against each library's real local store, read back with the library's own reader:
the config, every metric of every step, the generation tables, and one run across `--resume`."""

import json
import os
from pathlib import Path

import pytest
import readers
import yaml
from rlcore_cli import rlcore

from rlcore.context import RunContext
from rlcore.errors import ConfigError
from rlcore.generations import read as read_generations
from rlcore.metrics import MetricsLog
from rlcore_trackers.mlflow import MLflowTracker, metric_name
from rlcore_trackers.tensorboard import TensorBoardTracker
from rlcore_trackers.wandb import WandbTracker

IN_PROCESS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MLflowTracker}
"""Trackio fixes its store directory when first imported, so it is exercised through `rlcore run` only."""
CONFIG = {"trainer": {"steps": 4}, "algo": {"clip_high": 0.28}}
ROWS = [{"step": 2, "split": "train", "prompt": "user: 1+1=", "response": "2", "reward": 1.0,
         "finish_reason": "stop", "tool_calls": None, "correct": 1.0},
        {"step": 2, "split": "train", "prompt": "user: 2+2=", "response": "5", "reward": 0.0,
         "finish_reason": "length", "tool_calls": None, "correct": 0.0}]


def context(run_dir: Path, resumed: bool) -> RunContext:
    return RunContext(config=CONFIG, run_dir=run_dir, model=None, hardware=None, seed=0, resumed=resumed)


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_a_crash_after_a_checkpoint_resumes_into_the_same_run(name: str, tmp_path: Path) -> None:
    """Steps 1-2, a checkpoint, step 3, a crash; resumed from the checkpoint: step 3 again, then 4."""
    cls = IN_PROCESS[name]
    first = cls(cls.Options())
    first.setup(ctx=context(tmp_path, resumed=False))
    for step in (1, 2):
        first.log_metrics(step=step, metrics={"step": step, "reward/mean": step / 10, "eval/pass@1": 0.5, "x": None})
    first.log_generations(step=2, split="train", rows=ROWS)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    first.save_state(directory=checkpoint)
    first.log_metrics(step=3, metrics={"step": 3, "reward/mean": 30.0})
    first.teardown()  # the crash: the run closes as failed
    run_id = json.loads((tmp_path / "trackers" / f"{name}.json").read_text())["run_id"]

    resumed = cls(cls.Options())
    resumed.setup(ctx=context(tmp_path, resumed=True))
    resumed.load_state(directory=checkpoint)
    for step in (3, 4):
        resumed.log_metrics(step=step, metrics={"step": step, "reward/mean": step / 10})
    resumed.teardown()

    back = getattr(readers, name)(tmp_path)
    assert back.run_ids == {run_id}, "one run across the resume"
    assert back.config["algo"] == CONFIG["algo"] and back.config["trainer"]["steps"] == 4
    reward = back.metrics["reward/mean"]
    assert sorted(reward) == [1, 2, 3, 4] and all(values[-1] == pytest.approx(s / 10) for s, values in reward.items())
    if name == "tensorboard":
        assert reward[3] == [pytest.approx(0.3)], "what was logged after the checkpoint is purged"
    else:
        assert reward[3] == [30.0, pytest.approx(0.3)], "the library keeps both; the resumed value is the last"
    assert sorted(back.metrics[metric_name("eval/pass@1") if name == "mlflow" else "eval/pass@1"]) == [1, 2]
    assert "x" not in back.metrics and "step" not in back.metrics
    assert [row["prompt"] for row in back.tables[("train", 2)]] == ["user: 1+1=", "user: 2+2="]


def test_a_tracker_whose_library_is_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"tracker wandb needs the wandb package: pip install 'rlcore-trackers\[wandb\]'"):
        WandbTracker(WandbTracker.Options())


def test_mlflow_metric_names_are_valid_and_readable() -> None:
    assert metric_name("eval/pass@1") == "eval/pass_at_1" and metric_name("reward/mean") == "reward/mean"
    assert metric_name("a+b") == "a_b"


# ---- `rlcore run --set trainer.log_to=[...]`, resumed, read back ------------------------------------

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 steps logged to every tracker (checkpoints, evaluation and generation tables every 2 steps), then
    `--resume` to 6 steps. About 90 s, most of it MLflow creating its database and the libraries' imports."""
    root = tmp_path_factory.mktemp("tracked")
    run_dir, trackio_dir = root / "run", root / "trackio"
    env = {**os.environ, "TRACKIO_DIR": str(trackio_dir)}
    rlcore("run", "--run-dir", run_dir, "--steps", 4, "--set", "trainer.prompts_per_step=4", "--set", "sampling.n=4",
           "--set", "trainer.save_every=2", "--set", "trainer.eval_every=2", "--set", "trainer.eval_limit=4",
           "--set", "trainer.generations_every=2", "--set", f"trainer.log_to=[{','.join(TRACKERS)}]",
           "--set", "tracker.wandb.tags=[test]", env=env)
    rlcore("run", "--resume", run_dir, "--set", "trainer.steps=6", env=env)
    return run_dir, trackio_dir


@pytest.mark.slow
@pytest.mark.parametrize("name", TRACKERS)
def test_rlcore_run_logs_everything_to_the_tracker_and_resumes_into_the_same_run(
        name: str, tracked_run: tuple[Path, Path]) -> None:
    run_dir, trackio_dir = tracked_run
    back = readers.trackio(trackio_dir) if name == "trackio" else getattr(readers, name)(run_dir)
    record = json.loads((run_dir / "trackers" / f"{name}.json").read_text())
    assert back.run_ids == {record["run_id"]}, "one run across the resume"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert back.config == saved, "the config as resumed (trainer.steps=6)"
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        for key, value in row.items():
            if key == "step" or value is None:
                continue
            logged = back.metrics[metric_name(key) if name == "mlflow" else key][row["step"]]
            assert logged == [pytest.approx(value, rel=1e-6, abs=1e-6)], (name, row["step"], key, logged)
    tables = read_generations(run_dir)
    assert sorted(tables) == [(s, split) for s in (2, 4, 6) for split in ("eval", "train")]
    assert sorted(back.tables) == sorted((split, step) for step, split in tables)
    for (step, split), want in tables.items():
        got = back.tables[(split, step)]
        assert [r["prompt"] for r in got] == [r["prompt"] for r in want]
        if name != "tensorboard":  # TensorBoard's are Markdown text
            assert [r["response"] for r in got] == [r["response"] for r in want]
            assert [r["reward"] for r in got] == [r["reward"] for r in want]
            assert [r["finish_reason"] for r in got] == [r["finish_reason"] for r in want]
