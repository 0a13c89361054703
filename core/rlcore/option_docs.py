"""Options made discoverable: each option's name, type, default and attribute docstring (the string literal
right after the field, as the codebase documents attrs fields), as text for `rlcore plugins KIND NAME` and as
the README's markdown tables, which `python -m rlcore.option_docs README.md` regenerates between
`<!-- options KIND [NAME] -->` and `<!-- /options -->` markers (a test keeps them in step)."""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import attrs

from rlcore import plugins
from rlcore.errors import PluginError
from rlcore.run_config import SamplingOptions, TrainerOptions

CORE_SECTIONS = ("trainer", "sampling")
"""Sections of the core's own options, shown by `rlcore plugins trainer` / `rlcore plugins sampling`."""
MARKER = re.compile(r"(<!-- options (\w+)(?: (\S+))? -->\n)(.*?)(<!-- /options -->)", re.S)


@attrs.define
class OptionDoc:
    """One option as documented: its name, type, default (as set on the command line) and docstring."""

    name: str
    type: str
    default: str
    doc: str


@functools.lru_cache(maxsize=None)
def _own_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings written in `cls`'s own body (none when its source is not available)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for field, doc in zip(body, body[1:]):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of `cls` and its bases, a subclass's own winning over its bases'."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        docs.update(_own_docs(base))
    return docs


def _type_name(tp: Any) -> str:
    """A type as written in an annotation (`float | None`, `list[str]`, `float | Literal['auto'] | None`)."""
    if typing.get_origin(tp) is typing.Union:
        return " | ".join("None" if arg is type(None) else _type_name(arg) for arg in typing.get_args(tp))
    if typing.get_origin(tp) is not None or not hasattr(tp, "__name__"):
        return str(tp).replace("typing.", "").replace("NoneType", "None")
    return tp.__name__


def _value(value: Any) -> str:
    """A default as it would be written in `--set` or a YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value) if value != "" else '""'


def describe_options(cls: type) -> list[OptionDoc]:
    """Every option of the attrs class `cls`, in declaration order."""
    attrs.resolve_types(cls)
    docs = field_docs(cls)
    out = []
    for f in attrs.fields(cls):
        default = f.default
        if default is attrs.NOTHING:
            shown = "(required)"
        elif isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            shown = "(computed)" if default.takes_self else _value(default.factory())
        else:
            shown = _value(default)
        out.append(OptionDoc(f.name, _type_name(f.type), shown, docs.get(f.name, "")))
    return out


def options_of(kind: str, name: str | None) -> tuple[str, type]:
    """The section name (`kind`, or `tracker.NAME`) and options class of a core section or an installed plugin."""
    if kind in CORE_SECTIONS:
        return kind, {"trainer": TrainerOptions, "sampling": SamplingOptions}[kind]
    if kind not in plugins.KINDS:
        raise PluginError(f"unknown plugin kind or section {kind!r}; kinds are: {', '.join(plugins.KINDS)}; "
                          f"core sections: {', '.join(CORE_SECTIONS)}")
    if name is None:
        raise PluginError(f"name the {kind} plugin: rlcore plugins {kind} NAME, one of: "
                          f"{', '.join(plugins.available(kind)) or '(none)'}")
    return (f"tracker.{name}" if kind == "tracker" else kind), plugins.options_class(plugins.load(kind, name))


def as_text(section: str, options: list[OptionDoc]) -> str:
    """The options as `rlcore plugins KIND NAME` prints them."""
    if not options:
        return "no options"
    lines = [f"options (--set {section}.NAME=VALUE):"]
    for o in options:
        lines.append(f"  {o.name}: {o.type} = {o.default}")
        lines += [f"      {line}" for line in textwrap.wrap(o.doc, 100)]
    return "\n".join(lines)


def as_markdown(options: list[OptionDoc]) -> str:
    """The options as a README table."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{o.name}` | `{cell(o.type)}` | `{cell(o.default)}` | {cell(o.doc)} |" for o in options]
    return "\n".join(rows) + "\n"


def sync_tables(text: str) -> str:
    """`text` with every table between `<!-- options KIND [NAME] -->` and `<!-- /options -->` regenerated."""
    def table(m: re.Match[str]) -> str:
        _, cls = options_of(m.group(2), m.group(3))
        return m.group(1) + as_markdown(describe_options(cls)) + m.group(5)
    return MARKER.sub(table, text)


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        path.write_text(sync_tables(path.read_text()))
