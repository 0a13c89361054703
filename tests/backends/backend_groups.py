"""A multi-process backend started once per test module through rlcore's backend contract check, and restored
to its starting checkpoint before each test (which exercises `load_state` too)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from policy_losses import TokenMeanPG
from rlcore.context import RunContext
from rlcore.testing import check_backend, make_batch

B = TypeVar("B")


def contract_checked(backend: B, ctx: RunContext) -> Iterator[tuple[B, Path]]:
    """`backend` after the contract check (setup, logprobs, weights, save_state, update, load_state back to the
    start) and the checkpoint of its start; torn down when the generator closes."""
    start = ctx.run_dir / "start"
    start.mkdir()
    try:
        check_backend(backend, ctx, make_batch(vocab=17), TokenMeanPG(), start)
        yield backend, start
    finally:
        backend.teardown()  # type: ignore[attr-defined]


def at_start(group: tuple[Any, Path]) -> Any:
    """The group's backend, its starting state loaded again."""
    backend, start = group
    backend.load_state(directory=start)
    assert backend.steps == 0
    return backend
