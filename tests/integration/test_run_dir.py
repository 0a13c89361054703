"""What a run directory guarantees, through the real `rlcore` command: one run per directory, a lock,
honest resumes (only complete checkpoints, only options that may change, applied for real), a clean stop
on SIGTERM / SIGINT, and one-line errors for a full or read-only disk."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml
from click.testing import CliRunner
from rlcore_cli import RLCORE

from rlcore.cli import main
from rlcore.metrics import MetricsLog

SMALL = ["--set", "trainer.prompts_per_step=4", "--set", "sampling.n=4", "--seed", "5"]
VOLATILE = ("timing/", "tokens_per_s", "seconds")


def run(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


def ok(r):
    assert r.exit_code == 0, r.output
    return r


def stable(run_dir):
    return [{k: v for k, v in row.items() if not any(s in k for s in VOLATILE)}
            for row in MetricsLog.read(run_dir / "metrics.jsonl")]


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    ok(run("--run-dir", run_dir, "--steps", 4, *SMALL, "--set", "trainer.save_every=2"))
    return run_dir


def test_a_fresh_run_never_mixes_with_an_old_one(tmp_path, finished):
    """Before: the new run's checkpoints were pruned under the old ones, --resume restored the old run, and
    the old model/ was trained although another --seed (or --model) was given."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    r = run("--run-dir", run_dir, "--steps", 2, *SMALL[:-2], "--seed", 7)
    assert r.exit_code == 2 and f"run directory {run_dir} already holds a run" in r.output
    assert f"`rlcore run --resume {run_dir}`" in r.output and "--overwrite" in r.output
    assert {p: p.read_bytes() for p in before} == before  # nothing was touched

    ok(run("--run-dir", run_dir, "--steps", 2, *SMALL[:-2], "--seed", 7, "--overwrite"))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000002"]
    assert [r["step"] for r in MetricsLog.read(run_dir / "metrics.jsonl")] == [1, 2]
    assert (run_dir / "model" / "model.safetensors").read_bytes() != before[run_dir / "model" / "model.safetensors"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["seed"] == 7
    assert [e["event"] for e in history(run_dir)] == ["start", "finish"]


def test_resume_applies_a_new_learning_rate_and_records_when(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    r = ok(run("--resume", run_dir, "--steps", 6, "--set", "backend.lr=0.5"))
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000004'} at step 4" in r.output
    assert "changed from step 5 on: trainer.steps 4 -> 6; backend.lr 0.001 -> 0.5" in r.output
    assert [row["lr"] for row in MetricsLog.read(run_dir / "metrics.jsonl")] == [1e-3] * 4 + [0.5] * 2
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["backend"]["lr"] == 0.5 and saved["trainer"]["steps"] == 6
    resume = history(run_dir)[-2]
    assert resume["event"] == "resume" and resume["step"] == 4
    assert resume["changes"] == [{"key": "trainer.steps", "from": 4, "to": 6},
                                 {"key": "backend.lr", "from": 0.001, "to": 0.5}]


@pytest.mark.parametrize("args,refused", [
    (["--algo", "dapo"], "plugins.algo 'grpo' -> 'dapo'"),
    (["--backend", "lora"], "plugins.backend 'torch' -> 'lora'"),
    (["--model", "/elsewhere/model"], "trainer.model '' -> '/elsewhere/model'"),
    (["--set", "algo.clip_high=0.28"], "algo.clip_high 0.2 -> 0.28"),
])
def test_resume_refuses_what_would_make_another_run_and_keeps_the_config(tmp_path, finished, args, refused):
    """Before: `--algo dapo` trained grpo under a dapo label, and a failed `--backend lora` resume had already
    rewritten config.yaml so that the plain --resume failed too."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    config = (run_dir / "config.yaml").read_bytes()
    r = run("--resume", run_dir, "--steps", 5, *args)
    assert r.exit_code == 2 and refused in r.output and "would change what this run is" in r.output, r.output
    assert (run_dir / "config.yaml").read_bytes() == config
    ok(run("--resume", run_dir, "--steps", 5))


def _uninterrupted(tmp_path_factory, steps=6):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    ok(run("--run-dir", run_dir, "--steps", steps, *SMALL, "--set", "trainer.save_every=2"))
    return stable(run_dir)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    return _uninterrupted(tmp_path_factory)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("damage,reason", [
    (lambda c: shutil.rmtree(c / "backend"), "backend/model/chat_template.jinja is missing"),
    (lambda c: _truncate(c / "backend" / "model" / "model.safetensors"),
     "backend/model/model.safetensors has 1000 bytes"),
    (lambda c: (c / "backend" / "trainer.pt").unlink(), "backend/trainer.pt is missing"),
    (lambda c: (c / "core" / "trainer_state.json").write_text(""), "core/trainer_state.json has 0 bytes"),
])
def test_resume_skips_an_incomplete_checkpoint_and_continues_exactly(tmp_path, finished, six_steps, damage, reason):
    """Before: a checkpoint without backend/ resumed with the initial weights ("resumed ... at step 4"), and a
    truncated or emptied file gave a traceback although the previous checkpoint was intact."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    damage(run_dir / "checkpoints" / "step_000004")
    r = ok(run("--resume", run_dir, "--steps", 6))
    assert f"skipped incomplete checkpoint step_000004 ({reason}" in r.output
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000002'} at step 2" in r.output
    assert stable(run_dir) == six_steps
    assert history(run_dir)[-2]["skipped"][0]["checkpoint"].endswith("step_000004")


def test_resume_with_no_complete_checkpoint_is_an_error(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    for ckpt in (run_dir / "checkpoints").iterdir():
        (ckpt / "MANIFEST.json").unlink()
    r = run("--resume", run_dir, "--steps", 6)
    assert r.exit_code == 2 and "holds no complete checkpoint to resume from (step_000004: no MANIFEST.json" in r.output


def test_an_empty_saved_config_is_an_error_not_the_defaults(tmp_path, finished):
    """Before: --resume ran on defaults (seed 0 instead of 5)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "config.yaml").write_text("")
    r = run("--resume", run_dir, "--steps", 6)
    assert r.exit_code == 2 and f"{run_dir / 'config.yaml'} is empty" in r.output
    assert (run_dir / "config.yaml").read_text() == ""


def test_resume_with_fewer_steps_than_done_is_an_error_and_a_finished_run_is_a_no_op(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    r = run("--resume", run_dir, "--steps", 3)
    assert r.exit_code == 2 and "trainer.steps=3 is below the resumed step 4" in r.output
    r = ok(run("--resume", run_dir))
    assert "the run is complete at step 4" in r.output
    assert [row["step"] for row in MetricsLog.read(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


def _start(run_dir, steps, *extra, env=None):
    return subprocess.Popen([*RLCORE, "run", "--run-dir", str(run_dir), "--steps", str(steps), *map(str, SMALL),
                             "--set", "trainer.save_every=100", *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_steps(proc, run_dir, count):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(MetricsLog.read(metrics)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before step {count}: {proc.communicate()}")


@pytest.mark.slow
def test_a_live_run_directory_is_locked_and_names_its_holder(tmp_path):
    """~15 s. Before: a second run into the same directory exited 0 with metrics.jsonl interleaved, and a
    --resume of the live run crashed with FileNotFoundError."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, 100_000)
    try:
        _wait_for_steps(proc, run_dir, 1)
        for r in (run("--run-dir", run_dir, "--steps", 12, *SMALL), run("--resume", run_dir)):
            assert r.exit_code == 2, r.output
            assert f"run directory {run_dir} is in use by pid {proc.pid} on " in r.output
            assert f"(rlcore run --run-dir {run_dir} --steps 100000" in r.output  # the holder's command
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    ok(run("--resume", run_dir, "--steps", 2))  # the dead holder's lock does not block


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary_and_resumes_exactly(tmp_path):
    """~25 s. Before: SIGTERM exited -15 silently, losing up to save_every - 1 steps."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, 100_000)
    try:
        _wait_for_steps(proc, run_dir, 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    step = len(MetricsLog.read(run_dir / "metrics.jsonl"))
    assert "SIGTERM: finishing step" in err and "then saving a checkpoint" in err
    assert (f"stopped by SIGTERM at step {step} (checkpoint {run_dir / 'checkpoints' / f'step_{step:06d}'}); "
            f"resume with: rlcore run --resume {run_dir}") in err
    assert not (run_dir / "summary.json").exists() and history(run_dir)[-1]["event"] == "stop"
    ok(run("--resume", run_dir, "--steps", step + 2))
    full = tmp_path / "full"
    ok(run("--run-dir", full, "--steps", step + 2, *SMALL, "--set", "trainer.save_every=100"))
    assert stable(run_dir) == stable(full)


@pytest.mark.slow
def test_a_second_sigint_stops_at_once(tmp_path):
    """~20 s. Ctrl-C twice: the second one does not wait for the step (seconds long here) or the checkpoint."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, 500, "--set", "trainer.prompts_per_step=32", "--set", "sampling.n=4",
                  "--set", "sampling.max_new_tokens=100", "--set", "sampling.min_new_tokens=100")
    try:
        _wait_for_steps(proc, run_dir, 1)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "SIGINT: finishing step 2" in err
    assert "SIGINT again: stopped at once, without a checkpoint; no checkpoint was written yet" in err
    assert "Traceback" not in err and not (run_dir / "checkpoints").exists()
    assert len(MetricsLog.read(run_dir / "metrics.jsonl")) == 1


def _in_small_tmpfs(tmp_path, size_mb, script):
    """Run `script` (sh) with a private tmpfs of `size_mb` MiB mounted at $DISK (a user + mount namespace: no
    privileges needed, nothing outlives the test)."""
    if shutil.which("unshare") is None:
        pytest.fail("this test needs util-linux's unshare")
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "DISK": str(disk), "RLCORE": " ".join(RLCORE)}
    full = f"mount -t tmpfs -o size={size_mb}m tmpfs \"$DISK\" && {script}"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", full], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_full_disk_and_a_read_only_directory_are_one_line_each(tmp_path):
    """~40 s. A 3 MiB disk holds the model and the step-1 checkpoint but not the step-2 one. Before: a
    traceback (`inline_container.cc:672 unexpected pos`), then a --resume that failed on the leftover temporary
    directory."""
    out = tmp_path / "out"
    out.mkdir()
    script = (
        f"$RLCORE run --run-dir $DISK/run --steps 3 --set trainer.save_every=1 {' '.join(SMALL)} "
        f"> {out}/full.out 2> {out}/full.err; echo $? > {out}/full.rc; "
        f"ls -a $DISK/run/checkpoints > {out}/ckpts; "
        f"mount -o remount,size=64m $DISK && $RLCORE run --resume $DISK/run > {out}/resume.out 2>&1; "
        f"echo $? > {out}/resume.rc; cp $DISK/run/metrics.jsonl {out}/; "
        f"mount -o remount,ro $DISK && $RLCORE run --resume $DISK/run --steps 4 > {out}/ro.out 2> {out}/ro.err; "
        f"echo $? > {out}/ro.rc")
    proc = _in_small_tmpfs(tmp_path, 3, script)
    assert proc.returncode == 0, proc.stderr
    err = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() == "1", err
    disk = tmp_path / "disk"
    line = [x for x in err.splitlines() if x.startswith("Error:")]
    assert line == [f"Error: no space left on device: {disk}/run/checkpoints (while writing checkpoint step 2 to "
                    f"{disk}/run/checkpoints (its partial files were removed; step_000001 is intact)); free space "
                    "there or move the run directory to a larger disk, then resume"], err
    assert "Traceback" not in err
    assert (out / "ckpts").read_text().split() == [".", "..", "step_000001"]  # no temporary directory left
    assert (out / "resume.rc").read_text().strip() == "0", (out / "resume.out").read_text()
    assert [r["step"] for r in MetricsLog.read(out / "metrics.jsonl")] == [1, 2, 3]
    ro = (out / "ro.err").read_text()
    assert (out / "ro.rc").read_text().strip() == "1"
    assert f"Error: read-only file system: {disk}/run/run.lock; choose a writable directory" in ro
    assert "Traceback" not in ro
