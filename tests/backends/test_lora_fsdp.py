"""The lora backend on the fsdp base (`base: fsdp`): 2 CPU processes (gloo) against the single-process lora
backend (`base: torch`) on the same batches and starting adapters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoModelForCausalLM

from backend_groups import at_start, contract_checked
from policy_losses import TokenMeanPG
from rlcore import RolloutBatch, UpdatePlan
from rlcore.context import RunContext
from rlcore.testing import make_context
from rlcore_backends.common.adapters import load_adapters
from rlcore_backends.update.lora.backend import ADAPTER_DIR, LoRABackend

OPTIONS = {"lr": 1e-2, "rank": 4, "alpha": 8.0, "micro_batch_tokens": 40, "warmup_steps": 2, "weight_decay": 0.01,
           "lr_scheduler_type": "linear", "min_lr_ratio": 0.2, "total_training_steps": 6}


@pytest.fixture(scope="module")
def module_context(tmp_path_factory: pytest.TempPathFactory, rlcore_tiny_model: Path) -> RunContext:
    return make_context(tmp_path_factory.mktemp("lora-fsdp"), rlcore_tiny_model)


@pytest.fixture(scope="module")
def group(module_context: RunContext) -> Iterator[tuple[LoRABackend, Path]]:
    """A 2-rank lora-on-fsdp backend, through rlcore's backend contract check, and a checkpoint of its start."""
    yield from contract_checked(LoRABackend(LoRABackend.Options(base="fsdp", world_size=2, timeout_s=120, **OPTIONS)),
                                module_context)


@pytest.fixture
def fsdp_lora(group: tuple[LoRABackend, Path]) -> LoRABackend:
    return at_start(group)


@pytest.fixture
def torch_lora(rlcore_context: RunContext, group: tuple[LoRABackend, Path]) -> LoRABackend:
    """The one-process lora backend, started from the fsdp group's starting adapters (its peft checkpoint)."""
    backend = LoRABackend(LoRABackend.Options(**OPTIONS))
    backend.setup(ctx=rlcore_context)
    load_adapters(backend.model, group[1] / ADAPTER_DIR, torch.device("cpu"))
    return backend


def tensors(weights: object) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in weights.named_tensors()}  # type: ignore[attr-defined]


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_update_matches_lora_on_torch(fsdp_lora: LoRABackend, torch_lora: LoRABackend, batch: RolloutBatch) -> None:
    """Same logprobs (policy and reference), loss, metrics, updated adapters and merged weights."""
    start = tensors(fsdp_lora.adapter_weights())
    assert start and all(".lora_A." in n or ".lora_B." in n for n in start)
    assert_same(start, tensors(torch_lora.adapter_weights()), atol=0)
    base = tensors(fsdp_lora.merged_weights())
    assert_same(base, tensors(torch_lora.merged_weights()), atol=0)

    batch.old_logprobs = batch.rollout_logprobs - 0.1 * batch.response_mask
    for _ in range(2):
        want = torch_lora.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        got = fsdp_lora.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        for key in ("loss", "pg/ratio", "grad_norm", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key
    assert fsdp_lora.steps == torch_lora.steps == 4
    after = tensors(fsdp_lora.adapter_weights())
    assert_same(after, tensors(torch_lora.adapter_weights()), atol=1e-5)
    assert max(float((after[n] - start[n]).abs().max()) for n in start) > 1e-3
    merged = tensors(fsdp_lora.merged_weights())
    assert_same(merged, tensors(torch_lora.merged_weights()), atol=1e-5)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"]), "a base weight moved"
    for reference in (False, True):
        torch.testing.assert_close(fsdp_lora.logprobs(batch=batch, reference=reference),
                                   torch_lora.logprobs(batch=batch, reference=reference), atol=1e-5, rtol=0)
    torch.testing.assert_close(fsdp_lora.logprobs(batch=batch, reference=True), batch.rollout_logprobs,
                               atol=1e-5, rtol=0)


def test_policy_weights_follow_the_sync_option(fsdp_lora: LoRABackend) -> None:
    fsdp_lora.options.sync = "adapter"
    try:
        weights = fsdp_lora.policy_weights()
        assert weights.adapter and weights.adapter_config["r"] == 4
        assert all(".lora_" in n for n, _ in weights.named_tensors())
    finally:
        fsdp_lora.options.sync = "merged"
    assert not fsdp_lora.policy_weights().adapter


def test_checkpoint_is_peft_format_resumes_exactly_and_exports_merged(
        fsdp_lora: LoRABackend, batch: RolloutBatch, tmp_path: Path, module_context: RunContext) -> None:
    batch.old_logprobs = batch.rollout_logprobs
    fsdp_lora.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
    saved = tensors(fsdp_lora.adapter_weights())
    fsdp_lora.save_state(directory=tmp_path)
    config = json.loads((tmp_path / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert_same(load_file(tmp_path / ADAPTER_DIR / "adapter_model.safetensors"), saved, atol=0)
    first = fsdp_lora.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
    continued = tensors(fsdp_lora.adapter_weights())
    fsdp_lora.load_state(directory=tmp_path)
    assert fsdp_lora.steps == 2
    assert_same(tensors(fsdp_lora.adapter_weights()), saved, atol=0)
    again = fsdp_lora.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
    assert_same(tensors(fsdp_lora.adapter_weights()), continued, atol=0)
    assert {k: v for k, v in again.items() if not k.startswith("update/")} == \
        {k: v for k, v in first.items() if not k.startswith("update/")}

    fsdp_lora.load_state(directory=tmp_path)
    out = fsdp_lora.export_model(checkpoint=tmp_path, out=tmp_path / "export", ctx=module_context)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    merged = tensors(fsdp_lora.merged_weights())
    assert_same({n: exported[n] for n in merged}, merged, atol=1e-6)
