"""User-facing errors: the CLI prints their message (which names the problem and the fix), no traceback.

`user_message` is the one place that decides which exceptions are the user's or the environment's to fix
(an `RLCoreError`, a full disk, a read-only directory) and words them as one line; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class RLCoreError(Exception):
    """Base of every error caused by user input (plugins, options, data, config files)."""

    exit_code = 2
    """The CLI's exit status for it: 2, a usage error."""


class PluginError(RLCoreError):
    """An unknown, disabled or broken plugin was selected."""


class ConfigError(RLCoreError):
    """A config file, `--set` override or option value is invalid."""


class DataError(RLCoreError):
    """A dataset row or rollout is malformed."""


class TrainingError(RLCoreError):
    """Training cannot go on (NaN loss, a worker died)."""


class RunDirError(RLCoreError):
    """The run directory cannot be used as asked (in use, holds another run, resumed with changed options)."""


class CheckpointError(RLCoreError):
    """A checkpoint cannot be written or trusted."""


class DiskError(CheckpointError):
    """The disk refused a write (full, read-only, no permission): the machine's state, not the command, must change."""

    exit_code = 1


class StopNow(BaseException):
    """A second SIGTERM / SIGINT while a graceful stop was under way: leave at once, without a checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_OS_FIXES = {
    errno.ENOSPC: ("no space left on device", "free space there or move the run directory to a larger disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or move the run directory elsewhere"),
    errno.EROFS: ("read-only file system", "choose a writable directory (--run-dir, --out)"),
    errno.EACCES: ("permission denied", "fix its permissions or choose a directory you can write to"),
    errno.EPERM: ("operation not permitted", "fix its permissions or choose a directory you can write to"),
}
"""The OS errors that mean the environment, not rlcore, must change: what happened and the fix."""


def os_error(exc: BaseException) -> OSError | None:
    """The first OSError with one of the errno values in `_OS_FIXES` in `exc`'s cause / context chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _OS_FIXES:
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def describe_os_error(e: OSError, path: object = None) -> str:
    """One line for an OSError of `_OS_FIXES`: what happened, the path, and the fix."""
    what, fix = _OS_FIXES[e.errno]  # type: ignore[index]
    where = path or e.filename
    return f"{what}: {where}; {fix}" if where else f"{what}; {fix}"


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an exception the user (or the machine's state) must fix, or None for a
    bug, which deserves its traceback."""
    if isinstance(exc, RLCoreError):
        return str(exc)
    found = os_error(exc)
    return describe_os_error(found) if found is not None else None
