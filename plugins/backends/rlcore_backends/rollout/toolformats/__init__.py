"""Tool-call formats: how a model writes calls in its text (`rollout.tool_format`).

A format is a `rlcore.ToolFormat` class found through the `rlcore.tool_format` entry-point group, exactly
as third-party ones are: `hermes` (Qwen2.5 / Qwen3 / Hermes JSON) and `qwen3_coder` (Qwen3-Coder's XML)
ship with rlcore-backends.
"""

from __future__ import annotations

from functools import cache

from rlcore import ToolFormat
from rlcore import plugins
from rlcore.errors import PluginError


def available() -> list[str]:
    """Names of the installed tool-call formats."""
    return plugins.available("tool_format")


def check_tool_format(_inst: object, _attribute: object, value: str) -> None:
    """attrs validator: `value` names an installed tool-call format."""
    if value not in available():
        raise ValueError(f"tool_format={value!r} is not installed; installed formats: {', '.join(available())}")


@cache
def tool_format(name: str) -> ToolFormat:
    """The format `name`, instantiated once; a class that is not a `ToolFormat` is refused."""
    cls = plugins.load("tool_format", name)
    if not issubclass(cls, ToolFormat):
        raise PluginError(f"tool format {name!r} ({cls.__module__}.{cls.__qualname__}) must subclass rlcore.ToolFormat")
    return cls()
