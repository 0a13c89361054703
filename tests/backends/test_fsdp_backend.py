"""The fsdp backend with 2 CPU processes (gloo) against the single-process torch backend on the same batches.

One worker group serves the whole module (starting one costs seconds); it is started by rlcore's
backend contract check, and each test first restores its starting state from a checkpoint, which
exercises `load_state` too. The dead-worker test ends the group, so it comes last.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend_groups import at_start, contract_checked
from policy_losses import SequenceMeanPG, TokenMeanPG
from rlcore import RolloutBatch, SamplingParams, UpdatePlan
from rlcore.context import RunContext
from rlcore.errors import TrainingError
from rlcore.metrics import finish_mismatch
from rlcore.testing import make_context
from rlcore_backends.common import micro_batches
from rlcore_backends.update.fsdp.backend import FSDPBackend
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.update.torch.backend import TorchBackend

OPTIONS = {"lr": 1e-3, "micro_batch_tokens": 40, "warmup_steps": 2, "weight_decay": 0.01,
           "lr_scheduler_type": "cosine", "min_lr_ratio": 0.1, "total_training_steps": 6}
"""Shared by both backends: a budget of 40 tokens gives 2-3 samples per micro-batch; warmup then cosine decay."""


@pytest.fixture(scope="module")
def module_context(tmp_path_factory: pytest.TempPathFactory, rlcore_tiny_model: Path) -> RunContext:
    return make_context(tmp_path_factory.mktemp("fsdp"), rlcore_tiny_model)


@pytest.fixture(scope="module")
def group(module_context: RunContext) -> Iterator[tuple[FSDPBackend, Path]]:
    """A 2-rank fsdp backend and a checkpoint of its starting state, both made by rlcore's backend
    contract check (setup, logprobs, weights, save_state, update, load_state back to the start)."""
    yield from contract_checked(FSDPBackend(FSDPBackend.Options(world_size=2, timeout_s=120, **OPTIONS)),
                                module_context)


@pytest.fixture
def fsdp(group: tuple[FSDPBackend, Path]) -> FSDPBackend:
    """The module's fsdp backend, back at its starting state."""
    return at_start(group)


@pytest.fixture
def torch_backend(make_backend: Callable[..., TorchBackend]) -> TorchBackend:
    return make_backend(**OPTIONS)


def weights(backend: FSDPBackend | TorchBackend) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in backend.policy_weights().named_tensors()}


def assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def on_policy(batch: RolloutBatch) -> RolloutBatch:
    batch.old_logprobs = None
    return batch


def test_logprobs_match_torch_backend(fsdp: FSDPBackend, torch_backend: TorchBackend, batch: RolloutBatch) -> None:
    want = torch_backend.logprobs(batch=batch, reference=False)
    torch.testing.assert_close(fsdp.logprobs(batch=batch, reference=False), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(fsdp.logprobs(batch=batch, reference=True), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(want, batch.rollout_logprobs, atol=1e-5, rtol=0)


def test_update_matches_torch_backend(fsdp: FSDPBackend, torch_backend: TorchBackend, batch: RolloutBatch) -> None:
    """Same loss, metrics and updated weights over two calls of two optimizer steps (warmup, weight decay)."""
    batch.old_logprobs = batch.rollout_logprobs - 0.1 * batch.response_mask
    start = weights(fsdp)
    assert_same_weights(start, weights(torch_backend), atol=0)
    for _ in range(2):
        want = torch_backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        got = fsdp.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        assert got.keys() == want.keys()
        for key in ("loss", "pg/ratio", "entropy", "grad_norm", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key
    assert fsdp.steps == torch_backend.steps == 4 and fsdp.policy_weights().version == 4
    after = weights(fsdp)
    assert_same_weights(after, weights(torch_backend), atol=1e-5)
    moved = max(float((after[n] - start[n]).abs().max()) for n in start)
    assert moved > 1e-3, "the steps moved the weights by far more than the tolerance"
    torch.testing.assert_close(fsdp.logprobs(batch=batch, reference=False),
                               torch_backend.logprobs(batch=batch, reference=False), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [[0, 1, 5, 9, 10], [7]], ids=["uneven-shards", "one-rank-empty"])
def test_loss_uses_global_counts_across_ranks(fsdp: FSDPBackend, torch_backend: TorchBackend, batch: RolloutBatch,
                                              rows: list[int]) -> None:
    """Shards of different sizes, token counts and micro-batch counts (or no sample at all on one rank)
    give the whole mini-batch's token mean and sequence mean, as one process does."""
    part = on_policy(batch.select(rows))
    shards = micro_batches.rank_shards(part, 2)
    counts = [len(micro_batches.by_length(shard, OPTIONS["micro_batch_tokens"], micro_batches.pass_cost_tokens(
        torch.device("cpu")))[1]) for shard, real in shards if real]
    assert len(rows) == 1 or counts[0] != counts[1], f"ranks should run different numbers of passes: {counts}"
    mask, adv = part.response_mask, part.advantages
    token_mean = -float((adv * mask).sum() / mask.sum())
    got = fsdp.update(batch=part, loss=TokenMeanPG(), plan=UpdatePlan())
    assert got["loss"] == pytest.approx(token_mean, rel=1e-5, abs=1e-6)
    assert got["loss"] == pytest.approx(torch_backend.update(batch=part, loss=TokenMeanPG(), plan=UpdatePlan())["loss"],
                                        rel=1e-5, abs=1e-6)
    sequence_mean = -float(((adv * mask).sum(-1) / mask.sum(-1)).mean())
    assert fsdp.update(batch=part, loss=SequenceMeanPG(), plan=UpdatePlan())["loss"] == pytest.approx(
        sequence_mean, rel=1e-5, abs=1e-6)
    torch_backend.update(batch=part, loss=SequenceMeanPG(), plan=UpdatePlan())
    assert_same_weights(weights(fsdp), weights(torch_backend), atol=1e-5)


@pytest.mark.parametrize("rows", [[0, 1, 5, 9, 10], [7]], ids=["uneven-shards", "one-rank-empty"])
def test_the_mismatch_combines_over_ranks(fsdp: FSDPBackend, torch_backend: TorchBackend, batch: RolloutBatch,
                                          rows: list[int]) -> None:
    """Each rank measures its shard in the update's forward; sums, maxima and minima combine to what one
    process measures (a rank without samples contributes nothing)."""
    part = on_policy(batch.select(rows))
    noise = 0.05 * torch.randn(part.response_ids.shape, generator=torch.Generator().manual_seed(2))
    part.rollout_logprobs = part.rollout_logprobs + noise * part.response_mask
    got = finish_mismatch(fsdp.update(batch=part, loss=TokenMeanPG(), plan=UpdatePlan()))
    want = finish_mismatch(torch_backend.update(batch=part, loss=TokenMeanPG(), plan=UpdatePlan()))
    mismatch = {k: v for k, v in want.items() if k.startswith("mismatch/")}
    assert len(mismatch) == 6 and mismatch["mismatch/abs_diff_max"] > 0.01
    assert {k: v for k, v in got.items() if k.startswith("mismatch/")} == pytest.approx(mismatch, abs=1e-6)


def test_non_finite_loss_raises_and_the_group_goes_on(fsdp: FSDPBackend, batch: RolloutBatch) -> None:
    before = weights(fsdp)
    bad = on_policy(batch.select(range(len(batch))))
    bad.advantages = bad.advantages.clone()
    bad.advantages[-1, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"non-finite loss .* optimizer step 1.*backend\.lr"):
        fsdp.update(batch=bad, loss=TokenMeanPG(), plan=UpdatePlan())
    assert_same_weights(weights(fsdp), before, atol=0)
    assert fsdp.steps == 0
    fsdp.update(batch=on_policy(batch), loss=TokenMeanPG(), plan=UpdatePlan())
    assert fsdp.steps == 1


def test_save_load_resumes_bit_exactly_and_exports(fsdp: FSDPBackend, batch: RolloutBatch, tmp_path: Path,
                                                   module_context: RunContext) -> None:
    batch.old_logprobs = batch.rollout_logprobs
    fsdp.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
    saved = weights(fsdp)
    fsdp.save_state(directory=tmp_path)
    assert (tmp_path / "dcp" / ".metadata").is_file() and (tmp_path / "trainer.pt").is_file()
    first = fsdp.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
    continued = weights(fsdp)
    fsdp.load_state(directory=tmp_path)
    assert fsdp.steps == 2
    assert_same_weights(weights(fsdp), saved, atol=0)
    again = fsdp.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
    assert_same_weights(weights(fsdp), continued, atol=0)
    assert {k: v for k, v in again.items() if not k.startswith("update/")} == \
        {k: v for k, v in first.items() if not k.startswith("update/")}

    out = fsdp.export_model(checkpoint=tmp_path, out=tmp_path / "export", ctx=module_context)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert_same_weights(dict(exported.state_dict()), saved, atol=0)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == module_context.model.tokenizer.get_vocab()


def test_policy_weights_sync_into_the_hf_rollout(fsdp: FSDPBackend, rollout: HFRollout, batch: RolloutBatch) -> None:
    fsdp.update(batch=on_policy(batch), loss=TokenMeanPG(), plan=UpdatePlan())
    weights = fsdp.policy_weights()
    assert weights.module is None and weights.version == 1
    rollout.sync_weights(weights=weights)
    fresh = rollout.sample(prompts=batch.prompts[::3], params=SamplingParams(n=2, max_new_tokens=8, seed=0), tools=[], interaction=None)
    torch.testing.assert_close(fsdp.logprobs(batch=fresh, reference=False), fresh.rollout_logprobs, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_gradient_checkpointing_and_zero2_match_torch(rlcore_context: RunContext, torch_backend: TorchBackend,
                                                      batch: RolloutBatch) -> None:
    backend = FSDPBackend(FSDPBackend.Options(gradient_checkpointing=True, reshard_after_forward=False, **OPTIONS))
    backend.setup(ctx=rlcore_context)
    try:
        batch.old_logprobs = batch.rollout_logprobs
        got = backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        want = torch_backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        for key in ("loss", "grad_norm", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key
        assert_same_weights(weights(backend), weights(torch_backend), atol=1e-5)
    finally:
        backend.teardown()


@pytest.mark.slow
def test_bf16_mixed_precision_keeps_float32_master_weights(rlcore_context: RunContext, torch_backend: TorchBackend,
                                                           batch: RolloutBatch) -> None:
    backend = FSDPBackend(FSDPBackend.Options(param_dtype="bfloat16", reduce_dtype="float32", **OPTIONS))
    backend.setup(ctx=rlcore_context)
    try:
        torch.testing.assert_close(backend.logprobs(batch=batch, reference=False), batch.rollout_logprobs,
                                   atol=0.1, rtol=0)
        start = weights(backend)
        batch.old_logprobs = batch.rollout_logprobs
        got = backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
        want = torch_backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
        assert got["loss"] == pytest.approx(want["loss"], abs=0.05)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=0.1)
        after = weights(backend)
        assert all(t.dtype == torch.float32 for t in after.values())
        assert any(not torch.equal(after[n], start[n]) for n in start)
    finally:
        backend.teardown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nccl)")
def test_nccl_on_cuda_matches_torch_backend(tmp_path: Path, rlcore_tiny_model: Path, batch: RolloutBatch) -> None:
    ctx = make_context(tmp_path, rlcore_tiny_model, hardware="cuda")
    assert ctx.hardware.collective_backend() == "nccl"
    single = TorchBackend(TorchBackend.Options(**OPTIONS))
    single.setup(ctx=ctx)
    backend = FSDPBackend(FSDPBackend.Options(world_size=min(2, torch.cuda.device_count()), **OPTIONS))
    backend.setup(ctx=ctx)
    try:
        batch.old_logprobs = batch.rollout_logprobs
        torch.testing.assert_close(backend.logprobs(batch=batch, reference=False),
                                   single.logprobs(batch=batch, reference=False), atol=1e-4, rtol=0)
        got = backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        want = single.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-4)
        assert_same_weights(weights(backend), {n: t.cpu() for n, t in weights(single).items()}, atol=1e-4)
        (tmp_path / "ckpt").mkdir()
        backend.save_state(directory=tmp_path / "ckpt")
        backend.load_state(directory=tmp_path / "ckpt")
        assert backend.steps == 2
    finally:
        backend.teardown()


def test_a_dead_worker_is_reported_by_rank(fsdp: FSDPBackend, batch: RolloutBatch) -> None:
    """Last in the module: it ends the group."""
    os.kill(fsdp.group.processes[1].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"fsdp worker rank 1 \(pid \d+\) was killed by SIGKILL during 'update'"):
        fsdp.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    assert time.monotonic() - start < 30
    assert not any(p.is_alive() for p in fsdp.group.processes), "the other workers were stopped too"
    with pytest.raises(TrainingError, match="stopped earlier"):
        fsdp.logprobs(batch=batch, reference=False)
