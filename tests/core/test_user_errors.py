"""User mistakes end in one line that names the file, key or value and the fix, exit status 2, no traceback
(`--debug` shows it); invalid numbers are refused before they can crash a run."""

import errno
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rlcore.cli import main
from rlcore.errors import ConfigError, user_message

SMALL = ["--steps", "1", "--set", "trainer.prompts_per_step=2", "--set", "sampling.n=2"]


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_line_error(r, message, code=2):
    """The command failed with `code` and an `Error:` line holding `message`, and raised no exception of its own."""
    assert r.exit_code == code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("setting,message", [
    ("sampling.temperature=nan", "sampling.temperature: expected a finite number, got 'nan'"),
    ("sampling.top_p=.nan", "sampling.top_p: expected a finite number, got nan"),
    ("backend.lr=inf", "backend.lr: expected a finite number, got 'inf'"),
    ("backend.lr=-.inf", "backend.lr: expected a finite number, got -inf"),
    ("trainer.steps=.inf", "trainer.steps: expected int, got inf"),
    ("algo.clip_high=NaN", "algo.clip_high: expected a finite number"),
])
def test_nan_and_infinities_are_refused(setting, message):
    one_line_error(invoke("run", "--dry-run", "--set", setting), message)


@pytest.mark.parametrize("args,message", [
    (["--limit", "-3"], "Invalid value for '--limit': -3 is not in the range x>=1"),
    (["--limit", "0"], "Invalid value for '--limit': 0 is not in the range x>=1"),
    (["--temperature", "-1"], "'-1' must be a finite number >= 0"),
    (["--temperature", "nan"], "'nan' must be a finite number >= 0"),
    (["-n", "0"], "Invalid value for '--samples'"),
])
def test_eval_refuses_bad_numbers(args, message):
    r = invoke("eval", *args)
    assert r.exit_code == 2 and message in r.output, r.output


def test_eval_out_into_a_missing_directory_fails_before_evaluating(tmp_path):
    one_line_error(invoke("eval", "--out", tmp_path / "no" / "r.json"),
                   f"--out {tmp_path / 'no' / 'r.json'}: directory {tmp_path / 'no'} does not exist")


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_directory_without_config_is_named_not_a_config_flag(tmp_path, command):
    args = ["eval", "--run-dir", tmp_path] if command == "eval" else ["export", tmp_path, "--out", tmp_path / "m"]
    r = invoke(*args)
    one_line_error(r, f"{tmp_path}: no config.yaml there, so it is not a run directory")
    assert "--config" not in r.output


def test_export_onto_an_existing_file_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("trainer: {steps: 1}\n")
    target = tmp_path / "exported"
    target.write_text("precious")
    one_line_error(invoke("export", tmp_path, "--out", target), f"--out {target} already exists as a file")
    assert target.read_text() == "precious"


def test_run_dir_naming_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    one_line_error(invoke("run", "--run-dir", target, *SMALL), f"--run-dir {target} is a file, not a directory")


def test_resume_with_another_run_dir_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    one_line_error(invoke("run", "--resume", tmp_path / "a", "--run-dir", tmp_path / "b"),
                   f"--resume {tmp_path / 'a'} continues that run in its own directory, so --run-dir {tmp_path / 'b'} "
                   "would be ignored")


def test_unknown_placement_names_the_real_way_to_choose_one():
    r = invoke("run", "--dry-run", "--set", "plugins.placement=nope")
    one_line_error(r, "Choose one with --set plugins.placement=NAME")
    assert "--placement" not in r.output


@pytest.fixture
def model_copy(tmp_path, rlcore_tiny_model):
    copy = tmp_path / "model"
    shutil.copytree(rlcore_tiny_model, copy)
    return copy


def test_model_directory_without_weights(tmp_path, model_copy):
    (model_copy / "model.safetensors").unlink()
    one_line_error(invoke("run", "--model", model_copy, "--run-dir", tmp_path / "r", *SMALL),
                   f"--model '{model_copy}' has config.json but no weights (model.safetensors or pytorch_model.bin)")


def test_unknown_model_type(tmp_path, model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "qwen99"
    (model_copy / "config.json").write_text(json.dumps(config))
    one_line_error(invoke("run", "--model", model_copy, "--run-dir", tmp_path / "r", *SMALL),
                   "config.json (model_type 'qwen99') cannot be read by transformers")


def test_model_naming_a_file_that_is_not_a_model(tmp_path, model_copy):
    one_line_error(invoke("run", "--model", model_copy / "config.json", "--run-dir", tmp_path / "r", *SMALL),
                   "is a file but not a GGUF model (.gguf)")


def test_truncated_gguf_is_named_corrupt_not_a_missing_extra(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00\x05")  # magic, version 3, then a header cut short
    r = invoke("run", "--model", gguf, "--run-dir", tmp_path / "r", *SMALL)
    one_line_error(r, f"--model '{gguf}': cannot read the GGUF file")
    assert "truncated or corrupt" in r.output and "pip install" not in r.output
    assert not (tmp_path / "r" / "model").exists() and not (tmp_path / "r" / "model.building").exists()


def test_hub_id_while_offline(tmp_path):
    one_line_error(invoke("run", "--model", "someorg/no-such-model", "--run-dir", tmp_path / "r", *SMALL,
                          env={"HF_HUB_OFFLINE": "1"}),
                   "--model 'someorg/no-such-model' is not a local path and cannot be loaded from the Hugging Face hub")


def test_debug_shows_the_traceback():
    for args in (["--debug", "run"], ["run", "--debug"]):
        r = invoke(*args, "--dry-run", "--set", "sampling.temperature=nan")
        assert isinstance(r.exception, ConfigError), args
    proc = subprocess.run([sys.executable, "-m", "rlcore", "--debug", "run", "--dry-run", "--set", "backend.lr=inf"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError: backend.lr" in proc.stderr


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on device: /x/ckpt; free space"),
                                        (errno.EROFS, "read-only file system: /x/ckpt; choose a writable"),
                                        (errno.EACCES, "permission denied: /x/ckpt; fix its permissions")])
def test_disk_errors_become_one_line_naming_the_path_even_when_wrapped(code, words):
    try:
        try:
            raise OSError(code, "os says", "/x/ckpt")
        except OSError as inner:
            raise RuntimeError("a library's own wrapper") from inner
    except RuntimeError as e:
        assert user_message(e).startswith(words)
    assert user_message(ValueError("a bug")) is None and user_message(OSError(errno.ENOENT, "x")) is None
