"""The CLI's user-facing behaviour: listing plugins, and bad input giving one clear line, no traceback."""

import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

import rlcore
from rlcore.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and rlcore.__version__ in r.output


def test_plugins_lists_kind_name_distribution_version():
    r = invoke("plugins")
    assert r.exit_code == 0
    lines = {tuple(line.split()[:5]) for line in r.output.splitlines()}
    assert ("algo", "grpo", "rlcore-algorithms", "0.1.0", "ok") in lines
    assert ("rollout", "hf", "rlcore-backends", "0.1.0", "ok") in lines
    assert ("task", "arithmetic", "rlcore-tasks", "0.1.0", "ok") in lines


@pytest.mark.parametrize("kind,flag,installed", [
    ("algo", "--algo", "grpo"), ("backend", "--backend", "torch"), ("rollout", "--rollout", "hf"),
    ("task", "--task", "arithmetic"), ("hardware", "--hardware", "cpu")])
def test_unknown_plugin_of_each_kind(kind, flag, installed):
    r = invoke("run", flag, "nope", "--dry-run")
    assert r.exit_code == 2
    assert f"unknown {kind} plugin 'nope'" in r.output and installed in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


@pytest.mark.parametrize("args,message", [
    (["--set", "algo.bogus=1"], "algo.bogus: unknown option"),
    (["--set", "trainer.steps=abc"], "trainer.steps: expected int, got 'abc'"),
    (["--set", "sampling.top_p=2"], "top_p=2.0 must be in [0.0, 1.0]"),
    (["--set", "nosection=1"], "expected SECTION.KEY=VALUE"),
    (["--set", "bogus.key=1"], "unknown config section 'bogus'"),
    (["--config", "/nonexistent/c.yaml"], "does not exist"),
])
def test_bad_options_are_one_clear_line(args, message):
    r = invoke("run", "--dry-run", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("trainer: {steps: [1\n")
    r = invoke("run", "--dry-run", "--config", str(bad))
    assert r.exit_code == 2 and "is not valid YAML" in r.output


def test_dry_run_resolves_everything(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[trainer]\nsteps = 7\n[sampling]\nn = 4\n')
    r = invoke("run", "--dry-run", "--config", str(cfg), "--set", "trainer.steps=9", "--seed", "3")
    assert r.exit_code == 0, r.output
    resolved = yaml.safe_load(r.output.split("dry run:")[0])
    assert resolved["plugins"] == {"algo": "grpo", "backend": "torch", "rollout": "hf", "task": "arithmetic",
                                   "hardware": "cpu", "placement": "local"}
    assert resolved["trainer"]["steps"] == 9 and resolved["trainer"]["seed"] == 3 and resolved["sampling"]["n"] == 4
    assert resolved["backend"]["lr"] == 1e-3 and resolved["task"]["max_operand"] == 4  # the embedded preset, since no --model was given


def test_no_traceback_from_the_real_command():
    proc = subprocess.run([sys.executable, "-m", "rlcore", "run", "--algo", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown algo plugin 'nope'" in proc.stderr and "Traceback" not in proc.stderr
