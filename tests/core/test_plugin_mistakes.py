"""A plugin author's mistakes end early in one line with the fix: a misspelled hook at `--dry-run` (did you mean),
an entry point in an unknown group at `rlcore plugins`, an exception inside a hook (the plugin and hook named,
`--debug` for the traceback), a constructor that raises, and Options without defaults (the `--set` keys)."""

import attrs
import pytest
from click.testing import CliRunner

from rlcore.cli import main
from rlcore.config import build_options
from rlcore.errors import ConfigError

SMALL = ["--steps", "1", "--set", "trainer.prompts_per_step=2", "--set", "sampling.n=2", "--set",
         "trainer.save_every=0"]

PLUGINS = """
import attrs
from rlcore import hookimpl
from rlcore_tasks.arithmetic import Arithmetic


class Misspelled(Arithmetic):
    @hookimpl
    def scores(self, batch):
        return self.score(batch)


class SetupRaises(Arithmetic):
    @hookimpl
    def setup(self, ctx):
        raise KeyError("no such split: 'train'")


class InitRaises(Arithmetic):
    def __init__(self, options):
        raise RuntimeError("cannot open the data files")


class Required:
    @attrs.define
    class Options:
        data_dir: str
        limit: int
        seed: int = 0

    def __init__(self, options):
        self.options = options
"""


@pytest.fixture(autouse=True)
def mistakes(install_fake):
    install_fake(PLUGINS, {"rlcore.task": {"misspelled": "{mod}:Misspelled", "setup_raises": "{mod}:SetupRaises",
                                           "init_raises": "{mod}:InitRaises", "required": "{mod}:Required"},
                           "rlcore.tasks": {"lost": "{mod}:Misspelled"}})


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(r, code=2):
    """The one `Error:` line of a failed command that printed no traceback."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, r.output
    return lines[0]


def test_a_misspelled_hook_fails_the_dry_run_with_a_suggestion():
    assert error_line(invoke("run", "--task", "misspelled", "--dry-run")) == (
        "Error: task plugin 'misspelled' implements 'scores', which is not an rlcore hook; did you mean `score`?")


def test_a_constructor_that_raises_fails_the_dry_run_naming_the_plugin():
    line = error_line(invoke("run", "--task", "init_raises", "--dry-run"))
    assert line == "Error: task plugin 'init_raises': constructing it raised RuntimeError: cannot open the data files"


def test_the_dry_run_still_passes_a_correct_plugin():
    r = invoke("run", "--task", "setup_raises", "--dry-run")  # setup is not called by a dry run
    assert r.exit_code == 0 and "instantiated, hooks match the contract" in r.output, r.output


def test_an_entry_point_in_an_unknown_group_is_warned_about_with_the_right_group():
    r = invoke("plugins")
    assert r.exit_code == 0, r.output
    assert ("warning: entry point 'lost' of fake_rlcore_plugin_" in r.output
            and "is in the unknown group 'rlcore.tasks', so rlcore never loads it; did you mean `rlcore.task`?"
            in r.output), r.output


def test_an_exception_in_setup_is_one_line_naming_the_plugin_and_hook(tmp_path):
    line = error_line(invoke("run", "--task", "setup_raises", "--run-dir", tmp_path / "r", *SMALL), code=1)
    assert line == ("Error: task plugin 'setup_raises', hook 'setup' raised KeyError: \"no such split: 'train'\" "
                    "(--debug shows the traceback)")


def test_debug_shows_the_traceback_of_an_exception_in_a_hook(tmp_path):
    r = invoke("run", "--debug", "--task", "setup_raises", "--run-dir", tmp_path / "r", *SMALL)
    assert r.exit_code == 1 and isinstance(r.exception, KeyError), r.output


def test_options_without_defaults_name_the_set_keys_to_give():
    line = error_line(invoke("run", "--task", "required", "--dry-run"))
    assert line == ("Error: task: data_dir, limit have no default; give them: --set task.data_dir=... "
                    "--set task.limit=...")


def test_one_missing_option_is_named_alone():
    @attrs.define
    class Options:
        path: str

    with pytest.raises(ConfigError, match=r"^tracker.x: path has no default; give it: --set tracker.x.path=...$"):
        build_options(Options, {}, "tracker.x")
    assert build_options(Options, {"path": "p"}, "tracker.x").path == "p"
