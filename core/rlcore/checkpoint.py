"""Atomic, verified checkpoints: each is written into a temporary directory, sealed with a manifest and
renamed into place when complete.

A kill at any moment leaves either the previous checkpoints untouched or the new one whole; a failed
save (a full disk, a plugin's error) removes its temporary directory; a refused write is a DiskError.
`MANIFEST.json`, written last, records every file's size and CRC-32 and which plugins saved state; `verify` checks a checkpoint
against it before it is trusted, so a truncated, emptied or missing file, or a plugin's state that is
absent, makes a checkpoint incomplete rather than silently resumed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from rlcore.errors import DiskError, describe_os_error, os_error

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
TMP_PREFIX = ".tmp-"
LOW_SPACE_BYTES = 1 << 20
"""Free space below which a failed write is reported as a full disk (torch's writer hides the errno)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal_file(path: Path) -> tuple[int, str]:
    """fsync a file and return its size and CRC-32 (zlib releases the GIL, so files seal in parallel)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _threads(count: int) -> int:
    return max(1, min(count, os.cpu_count() or 1, 8))


def write_manifest(root: Path, state_dirs: Iterable[str], step: int) -> None:
    """fsync every file under `root`, then write `MANIFEST.json` (sizes, CRC-32s, plugins with state) last."""
    files = _files(root)
    with ThreadPoolExecutor(_threads(len(files))) as pool:
        sealed = list(pool.map(_seal_file, files))
    manifest = {"version": MANIFEST_VERSION, "step": step, "state": sorted(state_dirs),
                "files": {str(p.relative_to(root)): {"size": s, "crc32": c} for p, (s, c) in zip(files, sealed)}}
    path = root / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({p.parent for p in files} | {root}, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)


def verify(ckpt: Path, required_state: Iterable[str] = ()) -> str | None:
    """Why `ckpt` cannot be trusted (the first problem found), or None when it is complete: its manifest
    exists, every file it lists has the recorded size and CRC-32, and every name in `required_state` (the
    state directories of the plugins that save state) was saved."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (the save was cut short, or an older rlcore wrote it)"
    try:
        manifest = json.loads(path.read_text())
        files = {str(k): (int(v["size"]), str(v["crc32"])) for k, v in manifest["files"].items()}
        saved = set(manifest["state"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    missing_state = sorted(set(required_state) - saved)
    if missing_state:
        return f"no {missing_state[0]}/ state (that plugin's state was not saved)"
    for name, (size, _) in sorted(files.items()):
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} were written"
    names = sorted(files)
    with ThreadPoolExecutor(_threads(len(names))) as pool:
        crcs = list(pool.map(lambda n: _crc(ckpt / n), names))
    for name, crc in zip(names, crcs):
        if crc != files[name][1]:
            return f"{name} is corrupt (its CRC-32 differs from the one written)"
    return None


def _crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _write_failure(e: BaseException, root: Path, step: int, previous: Path | None) -> DiskError | None:
    """A one-line error for a save that failed because of the disk (full, read-only, no permission)."""
    found = os_error(e)
    kept = f"{previous.name} is intact" if previous is not None else "no earlier checkpoint exists"
    where = f"while writing checkpoint step {step} to {root} (its partial files were removed; {kept})"
    if found is not None:
        return DiskError(f"{describe_os_error(found, root)} ({where})")
    try:
        full = shutil.disk_usage(root).free < LOW_SPACE_BYTES
    except OSError:
        full = False
    if full:  # torch's writer reports a full disk as "unexpected pos", without an errno
        return DiskError(f"no space left on device: {root} ({where}); free space there or move the run "
                               "directory to a larger disk, then resume")
    return None


class Checkpoints:
    """The checkpoints of one run directory, newest kept `keep` deep."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root
        self.keep = keep

    def all(self) -> list[Path]:
        """Checkpoint directories (`step_NNNNNN`), oldest first, complete or not."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def newest_complete(self, required_state: Iterable[str] = ()) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The newest checkpoint that `verify` passes, and the newer ones it skipped, each with the reason."""
        required = list(required_state)
        skipped: list[tuple[Path, str]] = []
        for ckpt in reversed(self.all()):
            problem = verify(ckpt, required)
            if problem is None:
                return ckpt, skipped
            skipped.append((ckpt, problem))
        return None, skipped

    def remove_temporary(self) -> list[Path]:
        """Delete the temporary directories of saves that were killed (call only while holding the run's lock)."""
        stale = sorted(self.root.glob(TMP_PREFIX + "*")) if self.root.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def save(self, step: int, write: Callable[[Path], Iterable[str]]) -> Path:
        """Call `write(tmp_dir)`, which returns the state directories it wrote, seal the directory with its
        manifest, then rename it to `step_NNNNNN` in one atomic step and prune the oldest complete ones.
        A failure removes the temporary directory; a full or read-only disk becomes a DiskError."""
        previous = self.newest_written()
        tmp = self.root / f"{TMP_PREFIX}step_{step:06d}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_temporary()
            tmp.mkdir()
            state = write(tmp) or ()
            write_manifest(tmp, state, step)
        except BaseException as e:
            failure = _write_failure(e, self.root, step, previous) if isinstance(e, Exception) else None
            shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None:
                raise failure from e
            raise
        final = self.root / f"step_{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        for old in self.all()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def newest_written(self) -> Path | None:
        """The newest checkpoint directory with a manifest (not verified: for messages only)."""
        return next((p for p in reversed(self.all()) if (p / MANIFEST).is_file()), None)


def rng_state() -> dict[str, Any]:
    """Python, NumPy (if present) and torch CPU random states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_rng(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(rng_state(), f)


def load_rng(path: Path) -> None:
    with open(path, "rb") as f:
        set_rng_state(pickle.load(f))  # noqa: S301 - our own checkpoint file
