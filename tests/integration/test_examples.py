"""examples/: every recipe dry-runs on this CPU (plugins resolve, options valid, parallel sizes fit the devices,
every plugin's `check_run` accepts it, or refuses it with the reason for the recipes in REFUSED) and is listed in
examples/README.md; each family's CPU-sized recipe really runs (slow)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from rlcore_cli import rlcore

from rlcore.cli import main
from rlcore.metrics import MetricsLog
from rlcore.models import EMBEDDED_TOOLS, EMBEDDED_VL
from rlcore.plugins import available

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
RECIPES = sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.yaml")
                 if "rlcore-plugin-example" not in p.parts)

TRAIN_DEVICES = {"torch": lambda o: 1, "lora": lambda o: 1, "fsdp": lambda o: o["world_size"],
                 "megatron": lambda o: o["tp"] * o["pp"]}
"""Devices each backend trains on, from its options: must equal `placement.train_parallel`."""
REPLICA_DEVICES = {"hf": lambda o: 1, "vllm": lambda o: 1, "sglang": lambda o: o["tp_size"]}
"""Devices one engine of each rollout uses: must equal `placement.rollout_devices`."""


REFUSED = {"geo3k-multiturn/qwen2.5-vl-3b-megatron-8gpu.yaml": "backend megatron cannot train vision-language models"}
"""Recipes of a seed system rlcore cannot run yet: `--dry-run` must refuse them with the reason (and still print
their resolved config, whose sizes are checked like the others')."""


def invoke(*args: str) -> Any:
    """`rlcore ARGS` in this process (no interpreter start-up per recipe)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def missing_plugins(recipe: str) -> list[tuple[str, str]]:
    """(kind, name) of the plugins a recipe selects that are not installed."""
    selected = (yaml.safe_load((EXAMPLES / recipe).read_text()).get("plugins") or {}).items()
    return [(kind, name) for kind, name in selected if name != "auto" and name not in available(kind)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_runs_with_consistent_parallel_sizes(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    result = invoke("run", "--config", f"examples/{recipe}", "--dry-run")
    missing = missing_plugins(recipe)
    if missing:
        kind, name = missing[0]
        assert result.exit_code == 2 and f"unknown {kind} plugin {name!r}" in result.output, result.output
        pytest.skip(f"needs the {kind} plugin {name!r}, not installed: the dry run stops with the unknown-plugin error")
    if recipe in REFUSED:
        assert result.exit_code == 2 and REFUSED[recipe] in result.output, result.output
    else:
        assert result.exit_code == 0 and "every plugin accepts this run" in result.output, result.output
    config = yaml.safe_load(result.stdout.split("dry run:")[0])
    plugins, placement = config["plugins"], config["placement"]
    if plugins["placement"] == "ray":
        assert TRAIN_DEVICES[plugins["backend"]](config["backend"]) == placement["train_parallel"], \
            f"the {plugins['backend']} backend's world size must equal placement.train_parallel"
        assert REPLICA_DEVICES[plugins["rollout"]](config["rollout"]) == placement["rollout_devices"], \
            f"the {plugins['rollout']} engine's tensor-parallel size must equal placement.rollout_devices"
    gpus = re.search(r"(\d+)gpu", recipe)
    if gpus:
        assert plugins["hardware"] == "cuda"
        assert placement["nodes"] * placement["devices_per_node"] == int(gpus.group(1)), "the name says the GPU count"
    if "npu" in recipe:
        assert plugins["hardware"] == "npu"
    if recipe.split("/")[-1].startswith("cpu"):
        assert plugins["hardware"] == "cpu" and config["trainer"]["model"] in ("", EMBEDDED_VL, EMBEDDED_TOOLS), \
            "CPU recipes use an embedded model (vision-language for image tasks, the tool model for chat turns)"


MEGATRON_LM_RL = {
    ("trainer", "prompts_per_step"): 64, ("sampling", "n"): 16, ("trainer", "mini_batches"): 1,
    ("trainer", "epochs"): 1, ("backend", "micro_batch_size"): 1, ("algo", "clip_low"): 0.2,
    ("algo", "clip_high"): 0.28, ("algo", "kl_coef"): 0.0, ("algo", "loss_agg_mode"): "token-mean",
    ("algo", "dual_clip"): None, ("algo", "overlong_buffer"): 0, ("algo", "dynamic_sampling"): False,
    ("algo", "adv_eps"): 1e-4, ("backend", "lr"): 1e-6, ("backend", "warmup_steps"): 0,
    ("backend", "lr_scheduler_type"): "linear", ("backend", "min_lr_ratio"): 0.0,
    ("backend", "total_training_steps"): round(48828125 / 1024),
    ("backend", "weight_decay"): 0.0, ("backend", "betas"): [0.9, 0.95], ("backend", "eps"): 1e-8,
    ("backend", "max_grad_norm"): 1.0, ("backend", "tp"): 8, ("backend", "pp"): 1, ("backend", "dtype"): "bfloat16",
    ("backend", "sequence_parallel"): True, ("backend", "transformer_engine"): True,
    ("sampling", "temperature"): 1.0, ("sampling", "top_p"): 1.0, ("task", "format"): "tagged",
    ("trainer", "save_every"): 20, ("trainer", "eval_every"): 20, ("trainer", "steps"): 300,
}
"""NVIDIA/Megatron-LM examples/rl (README.md, model_configs/qwen_2p5_32b.sh with environment_configs/dapo.yaml):
--grpo-prompts-per-step 64, --grpo-group-size 16, --global-batch-size 1024 (one optimizer step per rollout),
--grpo-iterations 1, --micro-batch-size 1, --grpo-clamp-eps-lower/upper 0.2/0.28, --grpo-kl-beta 0,
--calculate-per-token-loss, the advantage's 1e-4 std damping, --lr 1e-6, --lr-warmup-samples 0, --weight-decay 0,
Megatron-LM's default linear LR decay to --min-lr 0 over --train-samples 48828125 (in steps of 1024 samples),
--adam-beta1/2 0.9/0.95, --adam-eps 1e-8, --clip-grad 1.0, tp 8, pp 1, --bf16, --sequence-parallel,
--transformer-impl transformer_engine, temperature 1.0 without top-p, the tagged math answers, --save-interval 20,
--eval-interval 20, and the README's 300 steps."""


def test_the_megatron_lm_recipe_has_megatron_lms_values(monkeypatch):
    monkeypatch.chdir(REPO)
    result = invoke("run", "--config", "examples/megatron-32b/qwen2.5-32b-dapo17k-64gpu.yaml", "--dry-run")
    config = yaml.safe_load(result.stdout.split("dry run:")[0])
    got = {key: config[key[0]][key[1]] for key in MEGATRON_LM_RL}
    assert got == MEGATRON_LM_RL
    budget = 12000  # Megatron-LM's --seq-length: prompt + response
    assert budget - 600 < config["sampling"]["max_new_tokens"] < budget
    assert config["trainer"]["prompts_per_step"] * config["sampling"]["n"] == 1024, "the global batch"


def test_every_recipe_has_a_line_in_the_readme():
    sections = {m.group(1): m.group(2) for m in re.finditer(r"\n## [^\n]*\(`([\w.-]+)/`\)\n(.*?)(?=\n## |\Z)",
                                                       (EXAMPLES / "README.md").read_text(), re.S)}
    for recipe in RECIPES:
        family, name = recipe.split("/")
        assert f"`{name}`" in sections.get(family, ""), f"examples/README.md has no line for {recipe}"


# ---- the CPU-sized recipes really run --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "expect"), [
    ("gsm8k-grpo/cpu.yaml", ["score/correct", "kl_ref"]),
    ("gsm8k-multiturn/cpu.yaml", ["rollout/turns", "rollout/tool_calls"]),
    ("gsm8k-multiturn/cpu-dapo-code.yaml", ["score/has_code", "filter/extra_rounds"]),
    ("gsm8k-multiturn/cpu-interaction.yaml", ["rollout/user_turns", "rollout/interaction_score"]),
    ("math-gmpo/cpu.yaml", ["score/correct", "score/timeout"]),
    ("geo3k-multiturn/cpu.yaml", ["score/correct", "score/format", "mismatch/abs_diff_max", "rollout/turns"]),
])
def test_cpu_recipe_runs(recipe, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = invoke("run", "--config", f"examples/{recipe}", "--run-dir", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    rows = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(key in rows[0] for key in expect), sorted(rows[0])
    assert (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()


@pytest.mark.slow
def test_cpu_megatron_pipeline_trains_converts_and_evaluates(tmp_path, monkeypatch):
    """examples/README.md's CPU pipeline: train, export, HF -> Megatron -> HF, evaluate the converted model."""
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    steps = [("run", "--config", "examples/megatron-32b/cpu.yaml", "--run-dir", str(run)),
             ("export", str(run), "--out", str(run / "hf")),
             ("convert", str(run / "hf"), str(run / "mcore"), "--backend", "megatron", "--to", "native"),
             ("convert", str(run / "mcore"), str(run / "hf-again"), "--backend", "megatron", "--to", "hf",
              "--model", str(run / "hf")),
             ("eval", "--model", str(run / "hf-again"), "--config", "examples/megatron-32b/cpu.yaml", "--limit", "4",
              "--out", str(run / "eval.json"))]
    for args in steps:
        result = invoke(*args)
        assert result.exit_code == 0, f"rlcore {' '.join(args)}:\n{result.output}"
    import json

    import torch
    from safetensors.torch import load_file

    before, after = load_file(run / "hf" / "model.safetensors"), load_file(run / "hf-again" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((run / "eval.json").read_text())["problems"] == 4


@pytest.mark.slow
def test_cpu_ray_recipe_places_fsdp_and_two_rollout_replicas(tmp_path):
    """The 8-GPU recipe's shape on 2 cores, through the real command: Ray, FSDP's 2 ranks, 2 rollout replicas."""
    run = tmp_path / "run"
    proc = rlcore("run", "--config", EXAMPLES / "gsm8k-grpo" / "cpu-ray.yaml", "--run-dir", run, cwd=REPO)
    assert "worker-0 (backend 'fsdp', rollout 'hf'" in proc.stderr and "worker-1 (rollout 'hf'" in proc.stderr
    assert "its backend trains on the devices of worker-0, worker-1" in proc.stderr
    rows = MetricsLog.read(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["sync/megabytes"] > 0 for r in rows)
    assert list((run / "ray").glob("session_*/logs"))
