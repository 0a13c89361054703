"""Local placement: every plugin runs in the driver process (the default)."""

from __future__ import annotations

from typing import Any

from rlcore import hookimpl


class LocalPlacement:
    """Instantiate each selected plugin in this process with its typed options."""

    @hookimpl
    def place(self, kind: str, name: str, cls: type, options: Any) -> Any:
        return cls(options) if options is not None else cls()
