"""`rlcore run --set plugins.placement=ray` for real: a local Ray instance on this CPU, its files in the run
directory, workers as Ray actors. Learns exactly like the single-process run; a killed worker stops the run with
an error naming it; no Ray process outlives the run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlcore.metrics import MetricsLog

pytest.importorskip("ray")

RLCORE = [sys.executable, "-m", "rlcore"]
STEPS = 40
RAY = ["--set", "plugins.placement=ray", "--set", "trainer.save_every=0"]
WORKER = re.compile(r"Ray worker (\S+) \(([^;]*); node (\S+), pid (\d+)\) started")


def run(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([*RLCORE, "run", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert proc.returncode == 0, f"rlcore run {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def rewards(run_dir: Path) -> list[float]:
    return [r["reward/mean"] for r in MetricsLog.read(run_dir / "metrics.jsonl")]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def assert_ray_cleaned_up(run_dir: Path, log: str) -> None:
    """Ray's files stayed in the run directory, its short symlink (if any) is gone, and no worker or Ray
    process of this run is left."""
    sessions = list((run_dir / "ray").glob("session_2*"))
    assert sessions and (sessions[0] / "logs").is_dir()
    link = re.search(r"through the short link (\S+)", log)
    if link:
        assert not Path(link.group(1).rstrip(":")).parent.exists()
    deadline = time.time() + 30
    pids = [int(m.group(4)) for m in WORKER.finditer(log)]
    while time.time() < deadline and (any(alive(p) for p in pids) or ray_processes(sessions[0].name)):
        time.sleep(0.5)
    assert not any(alive(p) for p in pids), "a Ray worker outlived the run"
    assert not ray_processes(sessions[0].name), "a Ray system process outlived the run"


def ray_processes(session: str) -> list[int]:
    """Live processes of this Ray session: named in their command line (gcs_server, raylet) or holding one of
    its log files open (agents, which rename themselves `ray::...`)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            named = session.encode() in (proc / "cmdline").read_bytes()
            holding = named or any(session in os.readlink(fd) for fd in (proc / "fd").iterdir())
            if holding and alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default recipe for STEPS steps in one process: the reference trajectory."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    run("--run-dir", run_dir, "--steps", STEPS, "--set", "trainer.save_every=0", cwd=run_dir.parent)
    return run_dir


@pytest.mark.slow
def test_colocated_ray_run_learns_exactly_like_the_local_run(local_run, tmp_path):
    """One colocated worker hosts the backend and the rollout, seeded like the driver: the same rewards."""
    run_dir = tmp_path / "run"
    start = time.time()
    proc = run("--run-dir", run_dir, "--steps", STEPS, *RAY, cwd=tmp_path)
    elapsed = time.time() - start
    local, ray = rewards(local_run), rewards(run_dir)
    print(f"ray colocated: reward {mean(ray[:10]):.3f} -> {mean(ray[-10:]):.3f} in {elapsed:.0f} s; "
          f"local {mean(local[:10]):.3f} -> {mean(local[-10:]):.3f}")
    assert ray[:10] == pytest.approx(local[:10], abs=1e-6)
    assert mean(ray[-10:]) >= 2 * mean(ray[:10]) and mean(local[-10:]) >= 2 * mean(local[:10])
    assert abs(mean(ray[-10:]) - mean(local[-10:])) < 0.05
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    assert all(r["sync/megabytes"] == 0.0 and r["sync/seconds"] > 0 for r in rows)  # in-process sync
    assert "worker-0 (backend 'torch', rollout 'hf'" in proc.stderr
    assert_ray_cleaned_up(run_dir, proc.stderr)


@pytest.mark.slow
def test_killed_disaggregated_worker_stops_the_run_with_an_error_naming_it(tmp_path):
    """Disaggregated: a training worker and a rollout worker, weights through the object store; SIGKILL the
    rollout worker mid-run and the command exits within seconds, naming it."""
    run_dir = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    args = ["run", "--run-dir", run_dir, "--steps", 500, *RAY, "--set", "placement.mode=disaggregated",
            "--set", "placement.devices_per_node=2"]
    with log.open("w") as err:
        proc = subprocess.Popen([*RLCORE, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (metrics.exists()
                                                                   and len(MetricsLog.read(metrics)) >= 3):
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
    rows = MetricsLog.read(metrics)
    assert all(r["sync/megabytes"] > 0.1 for r in rows)  # the rollout worker loaded exported weights
    workers = {m.group(1): m for m in WORKER.finditer(log.read_text())}
    assert set(workers) == {"train-0", "rollout-0"} and workers["rollout-0"].group(2) == "rollout 'hf'"
    os.kill(int(workers["rollout-0"].group(4)), signal.SIGKILL)
    killed = time.time()
    proc.wait(timeout=120)
    stopped = time.time() - killed
    text = log.read_text()
    print(f"killed rollout-0 after {len(rows)} steps; the run stopped {stopped:.1f} s later")
    assert proc.returncode == 2
    node, pid = workers["rollout-0"].group(3), workers["rollout-0"].group(4)
    name = f"Ray worker rollout-0 (rollout 'hf'; node {node}, pid {pid})"
    assert f"Error: {name} died during " in text and str(run_dir / "ray") in text
    assert_ray_cleaned_up(run_dir, text)


@pytest.mark.slow
def test_asynchronous_disaggregated_run_equals_the_asynchronous_local_run(tmp_path):
    """`trainer.max_staleness=1` with the trainer and the rollout on separate Ray workers (weights through the
    object store, sampled from the rollout thread): every step samples the same tokens as the one-process run,
    and its other metrics equal that run's to float32 rounding. Not bit for bit: the Ray trainer runs with the
    threads Ray assigns its worker (OMP_NUM_THREADS), the local one with two, and the shared-prompt pass
    (`backend.share_prompts`) rounds differently with the thread count (with it off, the runs are equal bit for
    bit)."""
    volatile = ("timing/", "tokens_per_s", "update/seconds", "sync/", "async/trainer_wait_s", "async/rollout_wait_s")
    args = ["--steps", 12, "--set", "trainer.save_every=0", "--set", "trainer.max_staleness=1"]
    run("--run-dir", tmp_path / "local", *args, cwd=tmp_path)
    proc = run("--run-dir", tmp_path / "ray", *args, *RAY, "--set", "placement.mode=disaggregated",
               "--set", "placement.devices_per_node=2", cwd=tmp_path)

    def stable(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith(volatile) and "tokens_per_s" not in k}
                for r in MetricsLog.read(run_dir / "metrics.jsonl")]
    ray, local = stable(tmp_path / "ray"), stable(tmp_path / "local")
    assert [r.keys() for r in ray] == [r.keys() for r in local]
    sampled = ("reward/", "response_length/", "rollout/", "score/", "async/staleness")
    assert [{k: v for k, v in r.items() if k.startswith(sampled)} for r in ray] == \
        [{k: v for k, v in r.items() if k.startswith(sampled)} for r in local]
    for a, b in zip(ray, local):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    assert [r["async/staleness_max"] for r in stable(tmp_path / "ray")] == [0.0] + [1.0] * 11
    assert_ray_cleaned_up(tmp_path / "ray", proc.stdout + proc.stderr)
