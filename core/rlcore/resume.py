"""What a resumed run may change: options that are legitimately changed mid-run (steps, learning rate and
its schedule, logging and trackers, evaluation and save cadence, where it runs) are applied from the resumed step on; options
that define the run (the model, the plugins, the algorithm's, task's and backend's structural options)
are refused, since applying them to restored state would make a different run under the old name.

A plugin lists its options that may change in a class attribute of its `Options`:
`RESUMABLE = ("lr", "warmup_steps")`; every other option of a plugin defines its run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from rlcore import plugins
from rlcore.errors import RunDirError
from rlcore.run_config import ResolvedConfig

CORE_RESUMABLE: dict[str, frozenset[str]] = {
    "trainer": frozenset({"steps", "save_every", "keep_checkpoints", "log_every", "log_mismatch", "eval_every",
                          "eval_limit", "eval_samples", "eval_temperature", "max_resample_rounds",
                          "max_reward_error_steps", "log_to", "generations_every", "generations_samples",
                          "keep_freed_memory"}),
    "sampling": frozenset({"max_new_tokens"}),
}
"""The core's options that may change on resume (see the module docstring)."""
PLACEMENT_KINDS = ("hardware", "placement")
"""Kinds that say where the run executes, not what it is: their selection and options may change."""
LOGGING_SECTIONS = ("tracker",)
"""Sections that say where the run is recorded (`tracker.NAME.*`), not what it is: they may change."""


@attrs.frozen
class Change:
    """One option whose value on resume differs from the saved run's."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resumable(cfg: ResolvedConfig) -> dict[str, frozenset[str]]:
    """The options of this run that may change on resume, by section."""
    out = dict(CORE_RESUMABLE)
    for kind, cls in cfg.classes.items():
        out[kind] = frozenset(getattr(plugins.options_class(cls), "RESUMABLE", ()))
    return out


def _may_change(key: str, allowed: dict[str, frozenset[str]]) -> bool:
    section, _, name = key.partition(".")
    if section == "plugins":
        return name in PLACEMENT_KINDS
    return section in PLACEMENT_KINDS or section in LOGGING_SECTIONS or name in allowed.get(section, frozenset())


def changes(saved: dict[str, Any], cfg: ResolvedConfig, run_dir: Path) -> list[Change]:
    """The options that differ between the saved config and the resumed one; a one-line error naming every
    option that would change what the run is, and how to start a new run instead."""
    old, new = _flat(saved), _flat(cfg.to_dict())
    found = [Change(k, old[k], new[k]) for k in new if k in old and old[k] != new[k]]
    allowed = resumable(cfg)
    refused = [c for c in found if not _may_change(c.key, allowed)]
    if refused:
        may = ", ".join(f"{s}.{n}" for s, names in sorted(allowed.items()) for n in sorted(names))
        raise RunDirError(
            f"--resume {run_dir}: {'; '.join(map(str, refused))} would change what this run is; resume without "
            f"{'these options' if len(refused) > 1 else 'that option'}, or start a new run with `rlcore run "
            f"--run-dir NEW_DIR ...` (from this run's weights: `rlcore export {run_dir} --out DIR`, then --model "
            f"DIR). Options that may change on resume: {may}, the hardware and placement, and the trackers' options")
    return found
