"""pytest fixtures for plugin tests, registered through the `pytest11` entry point of rlcore."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlcore.context import RunContext
from rlcore.testing.builders import tiny_model_dir
from rlcore.testing.contracts import make_context


@pytest.fixture(scope="session")
def rlcore_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the embedded tiny Qwen2 model and character tokenizer (built once)."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture
def rlcore_context(tmp_path: Path, rlcore_tiny_model: Path) -> RunContext:
    """A RunContext on the CPU hardware plugin with the tiny model, for setting one plugin up alone."""
    return make_context(tmp_path, rlcore_tiny_model)
