"""One run per run directory: the lock, refusing to mix runs, the saved config, and what a resume may change."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rlcore.errors import RunDirError
from rlcore.resume import changes
from rlcore.run_config import resolve
from rlcore.rundir import (ARTIFACTS, RunLock, holds_run, load_saved_config, prepare_fresh, record, write_atomic)

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rlcore.rundir import RunLock
    lock = RunLock(Path(sys.argv[1]))
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_locked_run_directory_names_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError) as e:
            RunLock(tmp_path).acquire()
        message = str(e.value)
        assert f"run directory {tmp_path} is in use by pid {holder.pid} on " in message
        assert "choose another --run-dir" in message
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead holder's lock: a stale lock file never blocks
        info = json.loads((tmp_path / "run.lock").read_text())
        assert info["pid"] == os.getpid()


def test_a_directory_holding_a_run_is_refused_unless_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints").mkdir()
    assert holds_run(tmp_path) == []  # an empty checkpoints/ and foreign files hold no run
    prepare_fresh(tmp_path, overwrite=False)
    (tmp_path / "config.yaml").write_text("trainer: {}\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_000010").mkdir()
    with pytest.raises(RunDirError, match=r"already holds a run \(config.yaml, checkpoints, model\): continue it "
                                          rf"with `rlcore run --resume {tmp_path}`, start over in it with --overwrite"):
        prepare_fresh(tmp_path, overwrite=False)
    prepare_fresh(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's own files went


@pytest.mark.parametrize("content,message", [
    (None, "no config.yaml there, so it is not a run directory"),
    ("", "config.yaml is empty, so this run's options are unknown"),
    ("trainer: [1\n", "config.yaml is not valid YAML"),
    ("- 1\n", "must hold a mapping of sections, got list"),
])
def test_a_missing_or_broken_saved_config_is_an_error_not_the_defaults(tmp_path, content, message):
    if content is not None:
        (tmp_path / "config.yaml").write_text(content)
    with pytest.raises(RunDirError, match=message):
        load_saved_config(tmp_path, "--resume")


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    write_atomic(path, "old: 1\n")

    def broken_replace(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(path, "new: 2\n")
    assert path.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_history_records_events(tmp_path):
    record(tmp_path, "resume", 10, changes=[{"key": "backend.lr", "from": 0.001, "to": 0.5}])
    row = json.loads((tmp_path / "history.jsonl").read_text())
    assert row["event"] == "resume" and row["step"] == 10 and row["changes"][0]["to"] == 0.5 and row["time"]


def test_overwrite_removes_every_artifact_name(tmp_path):
    for name in ARTIFACTS:
        (tmp_path / name).write_text("x")
    prepare_fresh(tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["run.lock"]


def test_overwrite_removes_the_trackers_stores_inside_the_run_directory_only(tmp_path):
    """A new TensorBoard writer in an old run's `tensorboard/` would mix both runs' curves in one chart."""
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    (run_dir / "trackers").mkdir(parents=True)
    outside.mkdir()
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events.out.tfevents.1").write_text("old curves")
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "trackers" / "tensorboard.json").write_text(json.dumps(
        {"tracker": "tensorboard", "run_id": "x", "files": ["tensorboard", "../outside", str(outside), ".."]}))
    assert holds_run(run_dir) == ["trackers"]
    with pytest.raises(RunDirError, match=r"already holds a run \(trackers\)"):
        prepare_fresh(run_dir, overwrite=False)
    prepare_fresh(run_dir, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"] and outside.is_dir()


BASE = {"trainer": {"steps": 10, "seed": 3}, "backend": {"lr": 1e-3}}


def _saved(**sections):
    return resolve({**BASE, **sections}).to_dict()


@pytest.mark.parametrize("new,expected", [
    ({"trainer": {"steps": 20, "seed": 3, "save_every": 5, "eval_every": 2}},
     {"trainer.steps": 20, "trainer.save_every": 5, "trainer.eval_every": 2}),
    ({"backend": {"lr": 0.5, "warmup_steps": 3, "max_grad_norm": 0.5}},
     {"backend.lr": 0.5, "backend.warmup_steps": 3, "backend.max_grad_norm": 0.5}),
    ({"sampling": {"max_new_tokens": 3}}, {"sampling.max_new_tokens": 3}),
    ({"plugins": {"hardware": "cuda"}}, {"plugins.hardware": "cuda"}),
    ({"backend": {"lr": 1e-3, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "min_lr_ratio": 0.1,
                  "total_training_steps": 40}},
     {"backend.lr_scheduler_type": "cosine", "backend.warmup_ratio": 0.1, "backend.min_lr_ratio": 0.1,
      "backend.total_training_steps": 40}),
    ({"trainer": {"steps": 10, "seed": 3, "log_to": ["tensorboard"], "generations_every": 0}},
     {"trainer.log_to": ["tensorboard"], "trainer.generations_every": 0}),
])
def test_options_changed_mid_run_are_allowed_and_listed(tmp_path, new, expected):
    found = changes(_saved(), resolve({**BASE, **new}), tmp_path)
    assert {c.key: c.new for c in found} == expected


def test_a_trackers_options_may_change_on_resume(tmp_path):
    tracked = {"trainer": {**BASE["trainer"], "log_to": ["tensorboard"]}}
    saved = _saved(**tracked)
    new = resolve({**BASE, **tracked, "tracker": {"tensorboard": {"log_dir": str(tmp_path / "tb")}}})
    assert [(c.key, c.new) for c in changes(saved, new, tmp_path)] == [("tracker.tensorboard.log_dir",
                                                                        str(tmp_path / "tb"))]


@pytest.mark.parametrize("new,key", [
    ({"plugins": {"algo": "dapo"}}, "plugins.algo 'grpo' -> 'dapo'"),
    ({"plugins": {"backend": "lora"}}, "plugins.backend 'torch' -> 'lora'"),
    ({"trainer": {"steps": 10, "seed": 4}}, "trainer.seed 3 -> 4"),
    ({"trainer": {"steps": 10, "seed": 3, "model": "/some/model"}}, "trainer.model '' -> '/some/model'"),
    ({"algo": {"clip_high": 0.3}}, "algo.clip_high 0.2 -> 0.3"),
    ({"task": {"max_operand": 9}}, "task.max_operand 4 -> 9"),
    ({"backend": {"lr": 1e-3, "weight_decay": 0.1}}, "backend.weight_decay 0.0 -> 0.1"),
    ({"sampling": {"temperature": 0.7}}, "sampling.temperature 1.0 -> 0.7"),
])
def test_options_that_define_the_run_are_refused_with_the_way_to_start_a_new_one(tmp_path, new, key):
    raw = {**BASE, **new}
    if "model" in raw.get("trainer", {}):
        cfg = resolve({**BASE, "trainer": {"steps": 10, "seed": 3}})
        cfg.trainer.model = "/some/model"
    else:
        cfg = resolve(raw)
    with pytest.raises(RunDirError) as e:
        changes(_saved(), cfg, tmp_path)
    message = str(e.value)
    assert key in message and "would change what this run is" in message
    assert f"rlcore export {tmp_path} --out DIR" in message and "backend.lr" in message  # how, and what may change
