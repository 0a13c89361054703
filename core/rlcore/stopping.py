"""Stopping a run on SIGTERM or SIGINT without losing work.

Once the loop is running (`arm`), the first signal only asks it to stop: the loop finishes the step under
way, writes a checkpoint at that step boundary and returns. A second signal, or one that arrives before
the loop started (while plugins set up), raises `StopNow` at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from rlcore.errors import StopNow

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + signum


class GracefulStop:
    """While entered, handles SIGTERM and SIGINT (main thread only); `requested` is the first signal's number."""

    def __init__(self, on_request: Callable[[str], None]) -> None:
        self.on_request = on_request
        """Called with the signal's name when the first signal asks the armed loop to stop."""
        self.requested: int | None = None
        self.armed = False
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.armed and self.requested is None:
            self.requested = signum
            self.on_request(signal.Signals(signum).name)
            return
        raise StopNow(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def arm(self) -> None:
        """From now on the first signal stops the loop gracefully. Installs the handlers again, since a
        plugin's setup (Ray's, for one) may have replaced them."""
        self.armed = True
        self._install()

    def __enter__(self) -> GracefulStop:
        self._install()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def ignore_signals() -> None:
    """For torchrun ranks other than 0: leave SIGTERM / SIGINT to rank 0, which stops the run at a step
    boundary and then closes these ranks (torchrun sends the signal to every rank)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
