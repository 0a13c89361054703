"""One run per run directory: its lock, the checks that keep a new run from mixing with an old one, the
saved config (written atomically) and `history.jsonl` (when the run started, resumed, changed options,
stopped, finished)."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from rlcore.errors import RunDirError

CONFIG = "config.yaml"
HISTORY = "history.jsonl"
LOCK = "run.lock"
TRACKERS = "trackers"
"""Where each tracker plugin records its run (`trackers/NAME.json`), with `files`: the entries of the run
directory that hold its local store (`tensorboard`, `wandb`, ...), which belong to the run like its metrics."""
RUN_FILES = (CONFIG, "metrics.jsonl", "generations.jsonl", "summary.json", HISTORY, "checkpoints", "model", TRACKERS)
"""What makes a directory hold a run (a directory counts when it has entries)."""
ARTIFACTS = (*RUN_FILES, "metrics.tmp", "report.png", "report.html", "model.building", "ray", LOCK)
"""Everything a run writes into its directory, besides its trackers' stores: what `--overwrite` removes
(other files are left alone)."""


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def check_is_directory(run_dir: Path, flag: str = "--run-dir") -> None:
    """A one-line error when `run_dir` exists but is not a directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{flag} {run_dir} is a file, not a directory: pass a directory (a new one for a new run)")


class RunLock:
    """An exclusive `flock` on `<run_dir>/run.lock`, recording who holds it (pid, host, start time, command).

    The kernel drops the lock when its holder exits, however it exits, so a lock left by a dead process
    never blocks; a live holder is named in the error."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RunDirError(f"run directory {self.path.parent} is in use by {self.holder()}; wait for that run "
                              "to end (or stop it), or choose another --run-dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now(), "command": command_line()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd

    def holder(self) -> str:
        """Who holds the lock, as its file says."""
        try:
            info = json.loads(self.path.read_text())
            return (f"pid {info['pid']} on {info['host']} since {info['started']} "
                    f"({info.get('command', '?')})")
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (its lock file names no holder yet)"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (unlinking it would race a waiter)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def command_line() -> str:
    """This process's command line, as a user would type it."""
    args = sys.argv[1:]
    return " ".join(["rlcore", *args]) if sys.argv and sys.argv[0].endswith(("rlcore", "__main__.py")) else \
        " ".join(sys.argv)


def holds_run(run_dir: Path) -> list[str]:
    """The entries that show `run_dir` already holds a run (empty when it holds none)."""
    found = []
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and any(path.iterdir()) or path.is_file():
            found.append(name)
    return found


def prepare_fresh(run_dir: Path, overwrite: bool) -> None:
    """Make sure a new run starts in a directory that holds no other run: refuse one that does, naming how
    to continue it or start over, or with `overwrite` remove every run artifact from it. Needs the lock."""
    found = holds_run(run_dir)
    if found and not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already holds a run ({', '.join(found)}): continue it with "
            f"`rlcore run --resume {run_dir}`, start over in it with --overwrite (deletes its config, metrics, "
            "checkpoints and built model), or choose another --run-dir")
    if overwrite:
        remove_artifacts(run_dir)


def tracker_files(run_dir: Path) -> set[str]:
    """The entries of `run_dir` that its trackers' records list as their stores (never a path outside it)."""
    names: set[str] = set()
    for record_file in sorted((run_dir / TRACKERS).glob("*.json")) if (run_dir / TRACKERS).is_dir() else ():
        try:
            listed = json.loads(record_file.read_text()).get("files") or []
        except (OSError, ValueError, AttributeError):
            continue
        for name in listed:
            if isinstance(name, str) and name and Path(name).name == name and name not in (".", ".."):
                names.add(name)
    return names


def present_artifacts(run_dir: Path) -> set[str]:
    """The run artifacts (the trackers' stores included) that exist in `run_dir` now."""
    return {name for name in (*ARTIFACTS, *tracker_files(run_dir))
            if (run_dir / name).exists() or (run_dir / name).is_symlink()}


def remove_artifacts(run_dir: Path, keep: set[str] = frozenset()) -> None:
    """Delete every run artifact in `run_dir` except the lock and those named in `keep`."""
    for name in sorted(present_artifacts(run_dir) - set(keep) - {LOCK}):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def load_saved_config(run_dir: Path, flag: str) -> dict[str, Any]:
    """The config a run saved in its directory; a one-line error naming the file when it is missing,
    empty or unreadable (never the defaults in its place)."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunDirError(f"{flag} {run_dir}: no {CONFIG} there, so it is not a run directory that `rlcore run` "
                          "wrote (or its config was deleted); pass the --run-dir of an rlcore run")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): restore it from the config the "
                          "run printed when it started, or start a new run") from None
    if not data:
        raise RunDirError(f"{path} is empty, so this run's options are unknown: restore it from the config the "
                          "run printed when it started (it is also in the run's log), or start a new run")
    if not isinstance(data, dict):
        raise RunDirError(f"{path} must hold a mapping of sections, got {type(data).__name__}: restore it from "
                          "the config the run printed when it started, or start a new run")
    return data


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a crash) sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_config(run_dir: Path, text: str) -> None:
    """Save the resolved config as `config.yaml`, atomically."""
    write_atomic(run_dir / CONFIG, text)


def record(run_dir: Path, event: str, step: int, **details: Any) -> None:
    """Append one event (start, resume, stop, finish) to `history.jsonl`, with the time and the command."""
    row = {"event": event, "step": step, "time": now(), "command": command_line(), **details}
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
