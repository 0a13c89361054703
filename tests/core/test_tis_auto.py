"""`algo.tis_cap: auto` (the default): truncated importance sampling on wherever the rollout's and the trainer's
precisions do not agree by design, settled into config.yaml by `rlcore run` and at setup for a script."""

import logging
import types

import pytest
from click.testing import CliRunner

from rlcore.cli import main
from rlcore.loop import Trainer
from rlcore.plugins import instantiate, load
from rlcore.run_config import resolve
from rlcore.toolkit.tis import AUTO_CAP, choose_tis_cap


def sides(trainer, rollout):
    config = {"plugins": {"backend": "torch", "rollout": "hf"}, "algo": {"tis_cap": "auto"}}
    if trainer is not None:
        config["backend"] = {"dtype": trainer}
    if rollout is not None:
        config["rollout"] = {"dtype": rollout}
    return config


@pytest.mark.parametrize(("trainer", "rollout", "cap"), [
    ("float32", "float32", None),
    ("bfloat16_matched", "bfloat16_matched", None),
    ("bfloat16", "bfloat16", AUTO_CAP),  # the same name, but a decode and a forward round differently
    ("float32", "bfloat16", AUTO_CAP),
    ("float32", "bfloat16_matched", AUTO_CAP),
    ("bfloat16_matched", "float32", AUTO_CAP),
    ("float32", "float16", AUTO_CAP),
    ("float32", "auto", None),  # a rollout's own `auto` left unsettled (sglang: the model's dtype): unknown
    (None, "bfloat16", None),  # a backend that names no dtype: unknown
])
def test_the_cap_follows_whether_the_two_sides_agree_by_design(trainer, rollout, cap):
    choice = choose_tis_cap(sides(trainer, rollout))
    assert choice.cap == cap
    assert ("not known" in choice.reason) == (None in (trainer, rollout) or "auto" in (trainer, rollout))


def test_fsdp_mixed_precision_is_the_trainers_precision():
    config = sides("float32", "float32")
    config["backend"]["param_dtype"] = "bfloat16"
    assert choose_tis_cap(config).cap == AUTO_CAP
    config["backend"]["param_dtype"] = "float32"
    assert choose_tis_cap(config).cap is None


def dry_run(*args):
    r = CliRunner().invoke(main, ["run", "--dry-run", *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_rlcore_run_settles_auto_after_the_plugins_settled_their_precisions(caplog):
    """The backend's `dtype: auto` follows the rollout's bfloat16 in the same settling, and tis_cap sees the result."""
    caplog.set_level(logging.INFO, logger="rlcore")
    assert "tis_cap: null" in dry_run()
    assert "algo.tis_cap=auto is off: both sides compute in float32" in caplog.text
    caplog.clear()
    assert "tis_cap: 2.0" in dry_run("--set", "rollout.dtype=bfloat16")
    assert "algo.tis_cap=auto is 2.0: bfloat16 on both sides still rounds differently" in caplog.text
    assert "tis_cap: 2.0" in dry_run("--set", "rollout.dtype=bfloat16", "--set", "backend.dtype=float32")
    assert "tis_cap: null" in dry_run("--set", "rollout.dtype=bfloat16", "--set", "algo.tis_cap=null")
    assert "tis_cap: 3.0" in dry_run("--set", "rollout.dtype=float32", "--set", "algo.tis_cap=3")
    for algo in ("gmpo", "gspo", "rloo"):
        assert "tis_cap: 2.0" in dry_run("--algo", algo, "--set", "rollout.dtype=bfloat16")


def test_a_script_trainer_settles_as_rlcore_run_does(tmp_path):
    """`Trainer.setup` settles the config first, so the backend's `dtype: auto` has followed the rollout's bfloat16
    when tis_cap is decided (the algorithm alone would see `auto` and call the precisions unknown)."""
    trainer = Trainer(resolve({"trainer": {"steps": 1, "prompts_per_step": 1}, "rollout": {"dtype": "bfloat16"}}),
                      tmp_path / "run", progress=False)
    try:
        trainer.setup()
        assert trainer.cfg.to_dict()["backend"]["dtype"] == "bfloat16"
        assert trainer.cfg.to_dict()["algo"]["tis_cap"] == AUTO_CAP and trainer.loss.tis_cap == AUTO_CAP
    finally:
        trainer.close()


def test_an_algorithm_set_up_outside_rlcore_run_settles_auto_from_the_run_config():
    algo = instantiate(load("algo", "grpo"), {}, "algo")
    assert algo.options.tis_cap == "auto"
    assert algo.policy_loss().tis_cap is None  # never set up: the precisions are unknown, so off
    algo.setup(ctx=types.SimpleNamespace(config=sides("float32", "bfloat16")))
    assert algo.options.tis_cap == AUTO_CAP and algo.policy_loss().tis_cap == AUTO_CAP
    same = instantiate(load("algo", "dapo"), {}, "algo")
    same.setup(ctx=types.SimpleNamespace(config=sides("float32", "float32")))
    assert same.policy_loss().tis_cap is None
    settled = instantiate(load("algo", "grpo"), {}, "algo")  # the config already settled it: taken as it is
    settled.setup(ctx=types.SimpleNamespace(config={**sides("float32", "float32"), "algo": {"tis_cap": 3.0}}))
    assert settled.policy_loss().tis_cap == 3.0
    explicit = instantiate(load("algo", "grpo"), {"tis_cap": 1.5}, "algo")
    explicit.setup(ctx=types.SimpleNamespace(config=sides("float32", "float32")))
    assert explicit.policy_loss().tis_cap == 1.5


@pytest.mark.parametrize("value", ["automatic", 0.5, "inf"])
def test_a_bad_cap_is_refused_with_one_line(value):
    r = CliRunner().invoke(main, ["run", "--dry-run", "--set", f"algo.tis_cap={value}"])
    assert r.exit_code == 2 and "tis_cap" in r.output and "Traceback" not in r.output
