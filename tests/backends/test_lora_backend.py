"""The lora backend: only adapters train, merged and adapter weights, peft checkpoints, merged export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from policy_losses import NeedsRef, TokenMeanPG
from rlcore import RolloutBatch, SamplingParams, UpdatePlan
from rlcore.config import build_options
from rlcore.context import RunContext
from rlcore.errors import ConfigError
from rlcore.testing import check_backend
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.common.logprobs import position_ids
from rlcore_backends.update.lora.backend import LoRABackend


def make_lora(ctx: RunContext, **options: object) -> LoRABackend:
    backend = LoRABackend(LoRABackend.Options(**{"lr": 1e-2, "rank": 4, "alpha": 8.0, **options}))
    torch.manual_seed(0)  # the same initial adapters every time
    backend.setup(ctx=ctx)
    return backend


def trained(backend: LoRABackend, batch: RolloutBatch, steps: int = 2) -> LoRABackend:
    batch.old_logprobs = batch.rollout_logprobs
    for _ in range(steps):
        backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    return backend


def named(module: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def logits(model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
    ids, mask = batch.sequences()
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits


def test_contract(rlcore_context: RunContext, batch: RolloutBatch, tmp_path: Path) -> None:
    check_backend(LoRABackend(LoRABackend.Options(lr=1e-2, rank=4)), rlcore_context, batch, TokenMeanPG(), tmp_path)


def test_only_the_adapters_train(rlcore_context: RunContext, batch: RolloutBatch) -> None:
    backend = make_lora(rlcore_context, target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in backend.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    optimized = {id(p) for group in backend.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in backend.model.named_parameters() if n in trainable}
    before = named(backend.model)
    trained(backend, batch)
    after = named(backend.model)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable), "a base weight changed"
    assert all(not torch.equal(before[n], after[n]) for n in trainable if ".lora_B." in n)


def test_gradient_checkpointing_gives_the_same_step(rlcore_context: RunContext, batch: RolloutBatch) -> None:
    plain, ckpt = make_lora(rlcore_context), make_lora(rlcore_context, gradient_checkpointing=True)
    assert ckpt.model.get_base_model().is_activation_checkpointing
    a, b = trained(plain, batch, steps=1), trained(ckpt, batch, steps=1)
    x, y = named(a.model), named(b.model)
    assert all(torch.allclose(x[n], y[n], atol=1e-6, rtol=0) for n in x)


def test_reference_is_the_frozen_base(rlcore_context: RunContext, batch: RolloutBatch) -> None:
    backend = make_lora(rlcore_context)
    start = backend.logprobs(batch=batch, reference=False)
    torch.testing.assert_close(start, batch.rollout_logprobs, atol=1e-5, rtol=0)
    trained(backend, batch)
    assert not torch.allclose(backend.logprobs(batch=batch, reference=False), start, atol=1e-3)
    torch.testing.assert_close(backend.logprobs(batch=batch, reference=True), start, atol=1e-6, rtol=0)
    batch.ref_logprobs = start
    backend.update(batch=batch, loss=NeedsRef(), plan=UpdatePlan())


def test_merged_and_adapter_weights(rlcore_context: RunContext, batch: RolloutBatch) -> None:
    backend = trained(make_lora(rlcore_context), batch)
    merged = backend.policy_weights()
    assert not merged.adapter and merged.module is None and merged.version == 2
    plain = AutoModelForCausalLM.from_pretrained(rlcore_context.model.path, dtype=torch.float32)
    plain.load_state_dict(dict(merged.named_tensors()), strict=True)
    torch.testing.assert_close(logits(plain, batch), logits(backend.model, batch), atol=1e-5, rtol=0)

    adapters = backend.adapter_weights()
    config = adapters.adapter_config
    assert adapters.adapter and adapters.version == 2
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    json.dumps(config)
    names = dict(adapters.named_tensors())
    assert names and all(n.startswith("base_model.model.") and (".lora_A." in n or ".lora_B." in n) for n in names)
    assert make_lora(rlcore_context, sync="adapter").policy_weights().adapter


def test_merged_sync_into_the_hf_rollout(rlcore_context: RunContext, rollout: HFRollout, batch: RolloutBatch) -> None:
    backend = trained(make_lora(rlcore_context), batch)
    rollout.sync_weights(weights=backend.policy_weights())
    fresh = rollout.sample(prompts=batch.prompts[::3], params=SamplingParams(n=2, max_new_tokens=8, seed=0), tools=[], interaction=None)
    torch.testing.assert_close(backend.logprobs(batch=fresh, reference=False), fresh.rollout_logprobs,
                               atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on transformers 5
def test_checkpoint_is_peft_format_resumes_exactly_and_exports_merged(
        rlcore_context: RunContext, batch: RolloutBatch, tmp_path: Path) -> None:
    backend = trained(make_lora(rlcore_context, weight_decay=0.01, warmup_steps=3), batch)
    backend.save_state(directory=tmp_path)
    adapter_dir = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert saved.keys() == dict(backend.adapter_weights().named_tensors()).keys()
    assert not list(tmp_path.glob("**/model.safetensors")), "the frozen base is not copied into checkpoints"
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(rlcore_context.model.path, dtype=torch.float32), str(adapter_dir))
    torch.testing.assert_close(logits(peft_model, batch), logits(backend.model, batch), atol=1e-6, rtol=0)

    out = backend.export_model(checkpoint=tmp_path, out=tmp_path / "export", ctx=rlcore_context)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in n for n in exported.state_dict())
    torch.testing.assert_close(logits(exported, batch), logits(backend.model, batch), atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == rlcore_context.model.tokenizer.get_vocab()

    resumed = make_lora(rlcore_context, weight_decay=0.01, warmup_steps=3)
    resumed.load_state(directory=tmp_path)
    assert resumed.steps == 2
    a = backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    b = resumed.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
    x, y = named(backend.model), named(resumed.model)
    assert all(torch.equal(x[n], y[n]) for n in x)
    with pytest.raises(ConfigError, match="do not fit this model"):
        make_lora(rlcore_context, target_modules=["q_proj"]).load_state(directory=tmp_path)


def test_options() -> None:
    opts = build_options(LoRABackend.Options, {"rank": "8", "target_modules": "q_proj,v_proj", "sync": "adapter"},
                         "backend")
    assert opts.rank == 8 and opts.target_modules == ["q_proj", "v_proj"] and opts.lr == 1e-5
    with pytest.raises(ConfigError, match="backend.sync: expected one of 'merged', 'adapter'"):
        build_options(LoRABackend.Options, {"sync": "full"}, "backend")
    opts = build_options(LoRABackend.Options, {"base": "fsdp", "world_size": "4"}, "backend")
    assert opts.base == "fsdp" and opts.world_size == 4 and LoRABackend.Options().base == "torch"
    with pytest.raises(ConfigError, match="backend.base: expected one of 'torch', 'fsdp'"):
        build_options(LoRABackend.Options, {"base": "megatron"}, "backend")
    # FSDP's mixed precision is refused where it would not run, rather than ignored
    with pytest.raises(ConfigError, match="backend: param_dtype=bfloat16 is FSDP's mixed precision, which "
                                          "base='torch' does not run"):
        build_options(LoRABackend.Options, {"param_dtype": "bfloat16"}, "backend")
    assert build_options(LoRABackend.Options, {"base": "fsdp", "param_dtype": "bfloat16",
                                               "reduce_dtype": "bfloat16"}, "backend").param_dtype == "bfloat16"
