"""Atomic checkpoints: each is written into a temporary directory and renamed into place when complete.

A kill at any moment leaves either the previous checkpoints untouched or the new one whole; `latest()`
only ever sees complete checkpoints (`step_NNNNNN`), never a half-written `.tmp-*` one.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoints:
    """The checkpoints of one run directory, newest kept `keep` deep."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root
        self.keep = keep

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.all()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Call `write(tmp_dir)`, make it durable, then rename it to `step_NNNNNN` in one atomic step."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-step_{step:06d}-{os.getpid()}"
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        final = self.root / f"step_{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        for old in self.all()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


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
