"""Options are discoverable: `rlcore plugins KIND NAME` prints each option's type, default and attribute
docstring (inherited ones included), and `--markdown` prints the README's table."""

import attrs
import pytest
from click.testing import CliRunner

from rlcore.cli import main
from rlcore.option_docs import OptionDoc, as_markdown, describe_options, field_docs
from rlcore.run_config import SamplingOptions, TrainerOptions


@attrs.define
class Base:
    lr: float = 1e-5
    """Learning rate."""
    betas: list[float] = attrs.field(factory=lambda: [0.9, 0.99])
    """AdamW's betas."""


@attrs.define
class Child(Base):
    path: str | None = None
    """Where | the data is."""
    rank: int = attrs.field(kw_only=True)
    undocumented: bool = True


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_docstrings_of_fields_and_inherited_fields():
    assert field_docs(Child) == {"lr": "Learning rate.", "betas": "AdamW's betas.", "path": "Where | the data is."}


def test_each_option_has_type_default_and_doc():
    assert describe_options(Child) == [
        OptionDoc("lr", "float", "1e-05", "Learning rate."),
        OptionDoc("betas", "list[float]", "[0.9, 0.99]", "AdamW's betas."),
        OptionDoc("path", "str | None", "null", "Where | the data is."),
        OptionDoc("rank", "int", "(required)", ""),
        OptionDoc("undocumented", "bool", "true", ""),
    ]


def test_markdown_escapes_pipes_in_cells():
    assert as_markdown(describe_options(Child)).splitlines()[4] == \
        r"| `path` | `str \| None` | `null` | Where \| the data is. |"


@pytest.mark.parametrize("cls", [TrainerOptions, SamplingOptions])
def test_every_core_option_is_documented(cls):
    assert [o.name for o in describe_options(cls) if not o.doc] == []


def test_rlcore_plugins_kind_name_prints_the_options():
    r = invoke("plugins", "algo", "grpo")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "options (--set algo.NAME=VALUE):"
    i = lines.index("  clip_high: float = 0.2")  # declared in rlcore.toolkit.ClipOptions, grpo's base
    assert "Ratios above 1 + clip_high are clipped" in lines[i + 1]
    assert "  kl_target: float | None = null" in lines
    assert "  tis_cap: float | Literal['auto'] | None = auto" in lines  # a union with a literal, as annotated


def test_rlcore_plugins_markdown_is_the_readme_table():
    r = invoke("plugins", "sampling", "--markdown")
    assert r.exit_code == 0 and r.output == as_markdown(describe_options(SamplingOptions)), r.output


@pytest.mark.parametrize("args, message", [
    (["algo"], "Error: name the algo plugin: rlcore plugins algo NAME, one of: "),
    (["algo", "nope"], "Error: unknown algo plugin 'nope'"),
    (["tasks", "x"], "Error: unknown plugin kind or section 'tasks'"),
])
def test_rlcore_plugins_refuses_what_it_cannot_show(args, message):
    r = invoke("plugins", *args)
    assert r.exit_code == 2 and message in r.output, r.output
