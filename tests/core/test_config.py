from typing import Literal

import attrs
import pytest

from rlcore.config import build_options, check_choice, check_range, load_file, merge, parse_overrides
from rlcore.errors import ConfigError
from rlcore.run_config import SamplingOptions


@attrs.define
class Opts:
    lr: float = 1e-3
    steps: int = attrs.field(default=10, validator=check_range(1))
    mode: Literal["token-mean", "seq-mean"] = "token-mean"
    kind: str = attrs.field(default="k1", validator=check_choice("k1", "k2", "k3"))
    flag: bool = False
    ops: list[str] = attrs.field(factory=lambda: ["+"])
    limit: int | None = None


def test_overrides_nest_and_parse_scalars():
    out = parse_overrides(["algo.clip_high=0.28", "trainer.steps=5", "task.ops=[+, -]", "algo.flag=true"])
    assert out == {"algo": {"clip_high": 0.28, "flag": True}, "trainer": {"steps": 5}, "task": {"ops": ["+", "-"]}}


def test_override_keeps_plain_strings_that_yaml_reads_as_lists():
    assert parse_overrides(["task.ops=-", "task.x=- a"]) == {"task": {"ops": "-", "x": "- a"}}


@pytest.mark.parametrize("bad", ["steps=5", "=3", "trainer.steps"])
def test_override_needs_section_key_value(bad):
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_overrides([bad])


def test_build_options_converts_strings():
    o = build_options(Opts, {"lr": "0.5", "steps": "3", "flag": "yes", "ops": "+,*", "limit": None}, "algo")
    assert (o.lr, o.steps, o.flag, o.ops, o.limit) == (0.5, 3, True, ["+", "*"], None)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as e:
        build_options(Opts, {"lrr": 1}, "backend")
    assert "backend.lrr" in str(e.value) and "lr" in str(e.value) and "steps" in str(e.value)


def test_literal_error_names_choices():
    with pytest.raises(ConfigError, match=r"algo.mode: expected one of 'token-mean', 'seq-mean', got 'bogus'"):
        build_options(Opts, {"mode": "bogus"}, "algo")


def test_validator_errors_name_field():
    with pytest.raises(ConfigError, match="kind='k9' is not allowed; choose one of 'k1', 'k2', 'k3'"):
        build_options(Opts, {"kind": "k9"}, "algo")
    with pytest.raises(ConfigError, match="steps=0 must be at least 1"):
        build_options(Opts, {"steps": 0}, "algo")


@pytest.mark.parametrize("value", ["abc", 1.5, True])
def test_int_rejects_non_integers(value):
    with pytest.raises(ConfigError, match="algo.steps: expected int"):
        build_options(Opts, {"steps": value}, "algo")


def test_merge_is_deep_and_non_destructive():
    base = {"a": {"x": 1, "y": 2}, "b": 1}
    assert merge(base, {"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}, "b": 1}
    assert base["a"]["y"] == 2


def test_load_file_yaml_and_toml(tmp_path):
    (tmp_path / "c.yaml").write_text("trainer:\n  steps: 3\n")
    (tmp_path / "c.toml").write_text("[trainer]\nsteps = 4\n")
    assert load_file(tmp_path / "c.yaml") == {"trainer": {"steps": 3}}
    assert load_file(tmp_path / "c.toml") == {"trainer": {"steps": 4}}


@pytest.mark.parametrize("name,text,match", [
    ("missing.yaml", None, "does not exist"),
    ("bad.yaml", "trainer: [1, 2", "is not valid YAML"),
    ("bad.toml", "[trainer\nsteps=1", "is not valid TOML"),
    ("list.yaml", "- 1\n- 2\n", "must hold a mapping"),
    ("c.json", "{}", "unknown format"),
])
def test_load_file_errors(tmp_path, name, text, match):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_file(tmp_path / name)


def test_sampling_min_new_tokens_is_bounded_by_max_new_tokens():
    options = build_options(SamplingOptions, {"max_new_tokens": "8", "min_new_tokens": "8"}, "sampling")
    assert options.params(seed=3).min_new_tokens == 8
    with pytest.raises(ConfigError, match="min_new_tokens=9 exceeds max_new_tokens=8; lower min_new_tokens"):
        build_options(SamplingOptions, {"max_new_tokens": 8, "min_new_tokens": 9}, "sampling")
    with pytest.raises(ConfigError, match="min_new_tokens=-1 must be at least 0"):
        build_options(SamplingOptions, {"min_new_tokens": -1}, "sampling")
