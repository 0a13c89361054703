"""`export_model` through the hook, on a fresh plugin instance (no setup), as `rlcore export` calls it:
the directory loads with transformers and gives the trained policy's logits (fsdp: test_fsdp_backend.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from policy_losses import TokenMeanPG
from rlcore import RolloutBatch, UpdatePlan
from rlcore.context import RunContext
from rlcore.plugins import Registry, load
from rlcore_backends.common.logprobs import position_ids


@pytest.mark.parametrize("name", ["torch", "lora"])
def test_export_loads_with_transformers_and_matches_the_policy(name: str, rlcore_context: RunContext,
                                                               batch: RolloutBatch, tmp_path: Path) -> None:
    cls = load("backend", name)
    trainer = cls(cls.Options(lr=1e-2))
    trainer.setup(ctx=rlcore_context)
    batch.old_logprobs = batch.rollout_logprobs
    for _ in range(2):
        trainer.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    trainer.save_state(directory=checkpoint)

    registry = Registry()
    registry.register("backend", name, cls(cls.Options()))
    out = registry.hook.export_model(checkpoint=checkpoint, out=tmp_path / "export", ctx=rlcore_context)
    assert out == tmp_path / "export" and (out / "config.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = batch.sequences()
    with torch.no_grad():
        want = trainer.model.eval()(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        got = exported(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        start = AutoModelForCausalLM.from_pretrained(rlcore_context.model.path, dtype=torch.float32)(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - start).abs().max() > 1e-2, "the export holds the trained policy, not the starting one"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("12*34+5=")["input_ids"] == rlcore_context.model.tokenizer("12*34+5=")["input_ids"]
