"""`models.build_model_dir`: an embedded model is built once, atomically; under torchrun by rank 0 only."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from rlcore import models
from rlcore.errors import ConfigError


def fake_build(calls: list[Path]):
    def build(directory: Path) -> None:
        calls.append(directory)
        directory.mkdir()
        (directory / "config.json").write_text("{}")
    return build


def test_rank_zero_builds_into_a_temporary_sibling_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    calls: list[Path] = []
    path = tmp_path / "model"
    path.mkdir()  # an interrupted earlier build, without config.json
    models.build_model_dir(path, fake_build(calls))
    models.build_model_dir(path, fake_build(calls))
    assert calls == [tmp_path / "model.building"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (path / "config.json").is_file()


def test_other_ranks_wait_for_rank_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    calls: list[Path] = []
    path = tmp_path / "model"
    timer = threading.Timer(0.5, lambda: (path.mkdir(), (path / "config.json").write_text("{}")))
    timer.start()
    start = time.monotonic()
    models.build_model_dir(path, fake_build(calls))
    assert calls == [] and time.monotonic() - start >= 0.4
    with pytest.raises(ConfigError, match="rank 0 did not build"):
        models.build_model_dir(tmp_path / "never", fake_build(calls), timeout_s=0.3)
