"""`check_run`: plugins refuse a run before anything starts, at `--dry-run` and at the start of `rlcore run`;
`modalities` carries what the prompts hold to every plugin's check; the model's config is read without weights."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from rlcore.cli import main
from rlcore.models import EMBEDDED_VL, build_tiny_model, read_config

GATE = '''
from rlcore import hookimpl

SEEN = []

class Gate:
    """An extra plugin that records what check_run received and refuses models with more than one layer."""

    @hookimpl
    def modalities(self):
        return ["image"]

    @hookimpl
    def check_run(self, config, model_config, modalities):
        SEEN.append((config["trainer"]["steps"], getattr(model_config, "model_type", None), sorted(modalities)))
        layers = getattr(model_config, "num_hidden_layers", 0)
        return [f"extra gate: {layers} layers is too deep; use a 1-layer model"] if layers > 1 else []

    @hookimpl
    def setup(self, ctx):
        raise AssertionError("setup must not run after a refusal")
'''


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, list(args))


def test_dry_run_and_run_stop_on_a_refusal_before_any_setup(install_fake, tmp_path: Path) -> None:
    import importlib

    module = importlib.import_module(install_fake(GATE, {"rlcore.extra": {"gate": "{mod}:Gate"}}))
    dry = invoke("run", "--dry-run", "--steps", "3")
    assert dry.exit_code == 2 and "Error: this run cannot work: extra gate: 2 layers is too deep" in dry.output
    assert module.SEEN == [(3, "qwen2", ["image"])], "the config, the embedded model's config and the modalities"
    run = invoke("run", "--steps", "1", "--run-dir", str(tmp_path / "run"))
    assert run.exit_code == 2 and "extra gate: 2 layers is too deep" in run.output and "Traceback" not in run.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_every_problem_is_listed_on_its_own_line() -> None:
    result = invoke("run", "--dry-run", "--backend", "megatron", "--task", "geo3k", "--hardware", "cpu")
    assert result.exit_code == 2, result.output
    lines = result.output.split("Error: this run cannot work:\n")[1].splitlines()
    assert any("task geo3k: its prompts carry images, but the model (model_type 'qwen2') is text-only" in x
               for x in lines)
    assert any("backend megatron cannot train vision-language models" in x for x in lines)
    assert any("backend megatron needs GPUs" in x for x in lines)


def test_dry_run_accepts_a_valid_run_and_says_what_it_read() -> None:
    result = invoke("run", "--dry-run", "--task", "geo3k", "--model", EMBEDDED_VL)
    assert result.exit_code == 0, result.output
    assert "every plugin accepts this run (model config Qwen2_5_VLConfig read)" in result.output
    offline = invoke("run", "--dry-run", "--model", "someone/not-downloadable-here")
    assert offline.exit_code == 0 and "not readable here, so the model checks were skipped" in offline.output


def test_model_configs_are_read_without_building(tmp_path: Path) -> None:
    """The embedded models' configs are built in memory and equal the ones their builders save."""
    from rlcore.models import build_tiny_vl_model

    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    for model, build in (("", build_tiny_model), (EMBEDDED_VL, build_tiny_vl_model)):
        saved = read_config(str(build(tmp_path / (model or "text"))))
        in_memory = read_config(model)
        for config in (saved, in_memory):
            assert config.model_type in ("qwen2", "qwen2_5_vl")
        text_saved, text_memory = saved.get_text_config(), in_memory.get_text_config()
        assert [getattr(text_saved, k) for k in keys[1:]] == [getattr(text_memory, k) for k in keys[1:]]
        assert saved.model_type == in_memory.model_type
    assert read_config(EMBEDDED_VL).vision_config is not None
    assert read_config(str(tmp_path / "nothing-here")) is None


def test_backends_and_rollouts_refuse_what_they_cannot_do() -> None:
    """Plugins' own checks: megatron's sizes (read from the model's config), vLLM adapters on a VL model."""
    sizes = invoke("run", "--dry-run", "--backend", "megatron", "--hardware", "cuda", "--set", "backend.tp=4")
    assert sizes.exit_code == 2 and "backend.tp=4 must divide the model's num_attention_heads (2)" in sizes.output
    adapters = invoke("run", "--dry-run", "--rollout", "vllm", "--backend", "lora", "--set", "backend.sync=adapter",
                      "--task", "colors", "--model", EMBEDDED_VL)
    assert adapters.exit_code == 2 and "vLLM applies LoRA adapters to the language model only" in adapters.output


SETTLER = '''
from rlcore import hookimpl

class Settler:
    """An extra plugin that settles an option from the model's config (as `dtype: auto` does)."""

    @hookimpl
    def settle_options(self, config, model_config):
        return {"sampling": {"max_new_tokens": model_config.num_hidden_layers * 3}}
'''


def test_settled_options_are_what_the_dry_run_prints_and_config_yaml_saves(install_fake, tmp_path: Path) -> None:
    install_fake(SETTLER, {"rlcore.extra": {"settler": "{mod}:Settler"}})
    dry = invoke("run", "--dry-run")
    assert dry.exit_code == 0 and "  max_new_tokens: 6\n" in dry.output, dry.output  # 2 layers; the preset says 4
    run = invoke("run", "--steps", "1", "--run-dir", str(tmp_path / "run"), "--set", "trainer.prompts_per_step=2")
    assert run.exit_code == 0, run.output
    assert "  max_new_tokens: 6\n" in (tmp_path / "run" / "config.yaml").read_text()
