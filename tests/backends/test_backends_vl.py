"""Images through the fsdp and lora backends, as the torch backend is tested with them (test_hf_rollout_vl.py):
the embedded tiny Qwen2.5-VL, real Geometry3K diagrams sampled by the hf rollout. fsdp (2 CPU ranks, gloo,
the vision blocks and decoder layers sharded) gives the torch backend's logprobs, loss, gradient norm and
updated weights, vision tower included; lora trains adapters on the vision tower and the decoder, and both sync
back into the rollout, whose logprobs then equal the trainer's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from policy_losses import TokenMeanPG
from rlcore import RolloutBatch, SamplingParams, UpdatePlan
from rlcore.context import RunContext
from rlcore.models import build_tiny_vl_model
from rlcore.testing import make_context
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.update.fsdp.backend import FSDPBackend
from rlcore_backends.update.lora.backend import LoRABackend
from rlcore_backends.update.torch.backend import TorchBackend
from vision_prompts import diagram_prompts

pytestmark = pytest.mark.slow  # the fsdp group spawns two ranks (~15 s)
OPTIONS = {"lr": 1e-2, "micro_batch_tokens": 200}
"""A budget that splits the batch into several micro-batches, each with its own samples' images."""
SAME_STEP = {**OPTIONS, "eps": 1e-3}
"""For comparing two backends' updated weights: with AdamW's default eps (1e-8), a weight whose gradient is
near 1e-8 moves by lr x g / (|g| + eps), so a rounding difference of 1e-9 in its gradient moves it by ~1e-3 x lr
more on one backend (seen on an AVX2 EPYC: 2 of 37632 patch-embedding weights 6.5e-5 apart). eps 1e-3 keeps
the step a smooth function of the gradient while every gradient above it still takes a full lr step."""


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    root = tmp_path_factory.mktemp("vl-backends")
    return make_context(root / "run", build_tiny_vl_model(root / "model", seed=0))


@pytest.fixture(scope="module")
def rollout(ctx: RunContext) -> HFRollout:
    r = HFRollout(HFRollout.Options())
    r.setup(ctx=ctx)
    return r


@pytest.fixture(scope="module")
def batch(rollout: HFRollout) -> RolloutBatch:
    b = rollout.sample(diagram_prompts(), SamplingParams(n=2, max_new_tokens=8, seed=5), [], None)
    b.advantages = torch.randn(b.response_ids.shape, generator=torch.Generator().manual_seed(0)) * b.response_mask
    return b


def weights(backend: object) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in backend.policy_weights().named_tensors()}


def agrees_with_rollout(backend: object, rollout: HFRollout, seed: int) -> float:
    """Sync the backend's weights into the rollout, sample afresh, and return max |trainer - rollout| logprob."""
    rollout.sync_weights(weights=backend.policy_weights())
    fresh = rollout.sample(diagram_prompts(), SamplingParams(n=2, max_new_tokens=8, seed=seed), [], None)
    mask = fresh.attention_mask.bool()
    return float((backend.logprobs(batch=fresh, reference=False) - fresh.rollout_logprobs)[mask].abs().max())


def test_fsdp_trains_with_images_as_the_torch_backend_does(ctx: RunContext, rollout: HFRollout,
                                                           batch: RolloutBatch) -> None:
    reference = TorchBackend(TorchBackend.Options(**SAME_STEP))
    reference.setup(ctx=ctx)
    fsdp = FSDPBackend(FSDPBackend.Options(world_size=2, timeout_s=120, **SAME_STEP))
    fsdp.setup(ctx=ctx)
    try:
        want = reference.logprobs(batch=batch, reference=False)
        mask = batch.attention_mask.bool()
        assert (want - batch.rollout_logprobs)[mask].abs().max() < 1e-4
        torch.testing.assert_close(fsdp.logprobs(batch=batch, reference=False), want, atol=1e-5, rtol=0)
        start = weights(fsdp)
        expected = reference.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        got = fsdp.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        for key in ("loss", "entropy", "grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
        after, torch_after = weights(fsdp), weights(reference)
        assert after.keys() == torch_after.keys()
        for name in after:
            torch.testing.assert_close(after[name], torch_after[name], atol=1e-5, rtol=0)
        vision = [n for n in after if "visual" in n]
        assert vision and max(float((after[n] - start[n]).abs().max()) for n in vision) > 1e-4, "the tower learns"
        assert agrees_with_rollout(fsdp, rollout, seed=6) < 1e-4
    finally:
        fsdp.teardown()


def test_lora_trains_adapters_on_the_vision_tower_and_syncs_merged(ctx: RunContext, rollout: HFRollout,
                                                                   batch: RolloutBatch, tmp_path: Path) -> None:
    lora = LoRABackend(LoRABackend.Options(rank=4, alpha=8.0, **OPTIONS))
    torch.manual_seed(0)
    lora.setup(ctx=ctx)
    mask = batch.attention_mask.bool()
    assert (lora.logprobs(batch=batch, reference=False) - batch.rollout_logprobs)[mask].abs().max() < 1e-4
    trained = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained) and any("visual" in n for n in trained)
    before = {n: p.detach().clone() for n, p in lora.model.named_parameters()}
    for _ in range(2):
        metrics = lora.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    moved = {n for n, p in lora.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(trained) and any("visual" in n for n in moved)
    torch.testing.assert_close(lora.logprobs(batch=batch, reference=True),
                               base_logprobs(ctx, batch), atol=1e-5, rtol=0)
    lora.save_state(directory=tmp_path)  # peft adapters, vision ones included, resume exactly
    fresh = LoRABackend(LoRABackend.Options(rank=4, alpha=8.0, **OPTIONS))
    fresh.setup(ctx=ctx)
    fresh.load_state(directory=tmp_path)
    torch.testing.assert_close(fresh.logprobs(batch=batch, reference=False),
                               lora.logprobs(batch=batch, reference=False), atol=0, rtol=0)
    assert agrees_with_rollout(lora, rollout, seed=7) < 1e-4


def base_logprobs(ctx: RunContext, batch: RolloutBatch) -> Tensor:
    """The starting policy's logprobs (the lora reference is the frozen base)."""
    base = TorchBackend(TorchBackend.Options())
    base.setup(ctx=ctx)
    return base.logprobs(batch=batch, reference=False)
