"""The torch backend on the real tiny model: logprobs, micro-batching, optimisation, checkpoints, sync."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from policy_losses import NeedsRef, TokenMeanPG
from rlcore import RolloutBatch, SamplingParams, UpdatePlan, Weights
from rlcore.config import build_options
from rlcore.context import RunContext
from rlcore.errors import ConfigError, TrainingError
from rlcore.metrics import finish_mismatch, logprob_mismatch
from rlcore.testing import check_backend
from rlcore_backends.common import micro_batches
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.update.torch.backend import TorchBackend

Factory = Callable[..., TorchBackend]


def grads_per_step(backend: TorchBackend) -> list[dict[str, Tensor]]:
    """Record the (clipped) gradients the optimizer sees at each step."""
    seen: list[dict[str, Tensor]] = []
    backend.optimizer.register_step_pre_hook(lambda *_: seen.append(
        {n: p.grad.clone() for n, p in backend.model.named_parameters()}))
    return seen


def params(backend: TorchBackend) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in backend.model.named_parameters()}


def test_contract(rlcore_context: RunContext, batch: RolloutBatch, tmp_path: Path) -> None:
    check_backend(TorchBackend(TorchBackend.Options(lr=1e-3)), rlcore_context, batch, TokenMeanPG(), tmp_path)


def test_logprobs_match_rollout(make_backend: Factory, batch: RolloutBatch) -> None:
    lp = make_backend(micro_batch_tokens=40).logprobs(batch=batch, reference=False)
    assert lp.shape == batch.response_ids.shape
    torch.testing.assert_close(lp, batch.rollout_logprobs, atol=1e-5, rtol=0)


def test_logprobs_rows_come_back_in_batch_order_from_length_buckets(make_backend: Factory, batch: RolloutBatch) -> None:
    """Rows are sorted by length and cut into several passes; each row's logprobs land on its own row."""
    one_pass = make_backend(micro_batch_tokens=10**6).logprobs(batch=batch, reference=False)
    tight = make_backend(micro_batch_tokens=60)
    order, passes = micro_batches.by_length(batch, 60, micro_batches.pass_cost_tokens(tight.device))
    assert len(passes) > 1 and order.tolist() != sorted(order.tolist()), "the rows are really reordered"
    torch.testing.assert_close(tight.logprobs(batch=batch, reference=False), one_pass, atol=1e-5, rtol=0)


def test_logprobs_same_alone_and_padded(make_backend: Factory, batch: RolloutBatch) -> None:
    """Position ids follow the attention mask: left padding does not change a sample's logprobs."""
    backend = make_backend(micro_batch_tokens=10**6)
    padded = backend.logprobs(batch=batch, reference=False)
    assert (batch.prompt_mask == 0).any(), "the batch has left padding"
    for i in range(len(batch)):
        alone = backend.logprobs(batch=batch.select([i]), reference=False)
        torch.testing.assert_close(alone[0], padded[i], atol=1e-5, rtol=0)


def test_micro_batch_split_does_not_change_gradients(make_backend: Factory, batch: RolloutBatch) -> None:
    batch.old_logprobs = batch.rollout_logprobs - 0.1 * batch.response_mask
    small, big = make_backend(lr=1e-3, micro_batch_tokens=1), make_backend(lr=1e-3, micro_batch_tokens=10**6)
    seen_small, seen_big = grads_per_step(small), grads_per_step(big)
    m_small = small.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
    m_big = big.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(mini_batches=2))
    assert len(seen_small) == len(seen_big) == 2
    for a, b in zip(seen_small, seen_big):
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    for key in ("loss", "grad_norm", "pg/ratio", "entropy"):
        assert m_small[key] == pytest.approx(m_big[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("micro_batch_tokens", [40, 10**6])
def test_a_one_step_update_measures_the_mismatch_in_its_own_forward(make_backend: Factory, batch: RolloutBatch,
                                                                    micro_batch_tokens: int) -> None:
    """What the loop's extra no-grad pass used to measure, maxima and minima included, from the update's
    forward over however many micro-batches; an update of several steps measures nothing."""
    noise = 0.05 * torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(1))
    batch.rollout_logprobs = batch.rollout_logprobs + noise * batch.response_mask
    backend = make_backend(lr=1e-3, micro_batch_tokens=micro_batch_tokens)
    want = logprob_mismatch(backend.logprobs(batch=batch, reference=False), batch.rollout_logprobs,
                            batch.response_mask)
    got = finish_mismatch(backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan()))
    assert {k: v for k, v in got.items() if k.startswith("mismatch/")} == pytest.approx(want, abs=1e-6)
    assert want["mismatch/abs_diff_max"] > 0.05 and want["mismatch/iw_std"] > 0.01
    assert not any(k.startswith("mismatch/") for k in backend.update(batch=batch, loss=TokenMeanPG(),
                                                                     plan=UpdatePlan(mini_batches=2)))


def test_update_reduces_the_loss(make_backend: Factory, batch: RolloutBatch) -> None:
    backend = make_backend(lr=3e-3)
    batch.old_logprobs = backend.logprobs(batch=batch, reference=False)
    losses = [backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())["loss"] for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1, losses
    assert backend.steps == 5 and backend.policy_weights().version == 5


def test_metrics_epochs_and_mini_batches(make_backend: Factory, batch: RolloutBatch) -> None:
    backend = make_backend(lr=1e-3, warmup_steps=4)
    metrics = backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan(epochs=2, mini_batches=2))
    assert backend.steps == 4
    assert set(metrics) == {"loss", "grad_norm", "lr", "pg/ratio", "entropy", "update/tokens_per_s",
                            "update/seconds"}
    assert metrics["lr"] == pytest.approx(1e-3 * (1 + 2 + 3 + 4) / 4 / 4), "linear warmup, averaged over 4 steps"
    assert backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())["lr"] == pytest.approx(1e-3)
    assert metrics["pg/ratio"] > 0 and metrics["entropy"] > 0 and metrics["update/tokens_per_s"] > 0


def test_reference_is_lazy_and_frozen(make_backend: Factory, batch: RolloutBatch) -> None:
    backend = make_backend(lr=1e-2)
    start = backend.logprobs(batch=batch, reference=False)
    backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    assert backend.reference is None, "no reference model without a KL loss"
    ref = backend.logprobs(batch=batch, reference=True)
    assert backend.reference is not None
    torch.testing.assert_close(ref, start, atol=1e-6, rtol=0)
    assert not torch.allclose(backend.logprobs(batch=batch, reference=False), start, atol=1e-4)
    batch.ref_logprobs = ref
    backend.update(batch=batch, loss=NeedsRef(), plan=UpdatePlan())


def test_non_finite_loss_raises_before_the_step(make_backend: Factory, batch: RolloutBatch) -> None:
    backend = make_backend(lr=1e-3)
    before = params(backend)
    batch.advantages[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"non-finite loss .* optimizer step 1.*backend\.lr.*rewards"):
        backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    after = params(backend)
    assert all(torch.equal(before[n], after[n]) for n in before) and backend.steps == 0


def test_save_load_resumes_identically(make_backend: Factory, batch: RolloutBatch, tmp_path: Path) -> None:
    options = {"lr": 1e-3, "warmup_steps": 3, "weight_decay": 0.01}
    first = make_backend(**options)
    first.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    first.save_state(directory=tmp_path)
    resumed = make_backend(**options)
    resumed.load_state(directory=tmp_path)
    a, b = params(first), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a) and resumed.steps == first.steps == 1
    sa, sb = first.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][f], sb[k][f]) for k in sa for f in sa[k])
    ma = first.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    mb = resumed.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    a, b = params(first), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a) and ma["loss"] == mb["loss"] and ma["lr"] == mb["lr"]


def test_a_resume_with_another_lr_trains_with_it_on_the_same_schedule(make_backend: Factory, batch: RolloutBatch,
                                                                       tmp_path: Path) -> None:
    """Loading the optimizer and scheduler restored the saved run's learning rate, so `--resume --set
    backend.lr=...` was recorded but not applied."""
    first = make_backend(lr=1e-3, warmup_steps=3)
    assert first.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())["lr"] == pytest.approx(1e-3 / 3)
    first.save_state(directory=tmp_path)
    resumed = make_backend(lr=0.5, warmup_steps=3)
    resumed.load_state(directory=tmp_path)
    metrics = resumed.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    assert metrics["lr"] == pytest.approx(0.5 * 2 / 3)  # the new peak, at the second warmup step
    assert resumed.scheduler.base_lrs == [0.5] and resumed.optimizer.param_groups[0]["initial_lr"] == 0.5
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # warmup over after step 2 (of 3: 3/3)


@pytest.mark.parametrize("through_module", [True, False])
def test_sync_weights_makes_rollout_match_trainer(make_backend: Factory, rollout: HFRollout,
                                                  batch: RolloutBatch, through_module: bool) -> None:
    backend = make_backend(lr=1e-2)
    backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    weights = backend.policy_weights()
    if not through_module:
        weights = Weights(named_tensors=weights.named_tensors, version=weights.version)
    assert rollout.sync_weights(weights=weights)["sync/seconds"] >= 0
    fresh = rollout.sample(prompts=batch.prompts[::3], params=SamplingParams(n=2, max_new_tokens=8, seed=0), tools=[], interaction=None)
    torch.testing.assert_close(backend.logprobs(batch=fresh, reference=False), fresh.rollout_logprobs,
                               atol=1e-5, rtol=0)


def test_bf16_and_gradient_checkpointing(make_backend: Factory, batch: RolloutBatch) -> None:
    plain, ckpt = make_backend(lr=1e-3), make_backend(lr=1e-3, gradient_checkpointing=True)
    assert ckpt.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    seen_plain, seen_ckpt = grads_per_step(plain), grads_per_step(ckpt)
    batch.old_logprobs = batch.rollout_logprobs
    plain_metrics = plain.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    ckpt.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    for name in seen_plain[0]:
        torch.testing.assert_close(seen_plain[0][name], seen_ckpt[0][name], atol=1e-5, rtol=1e-4)
    bf16 = make_backend(lr=1e-3, dtype="bfloat16")
    torch.testing.assert_close(bf16.logprobs(batch=batch, reference=False), batch.rollout_logprobs,
                               atol=0.1, rtol=0)
    metrics = bf16.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"], abs=0.05) and metrics["grad_norm"] > 0


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="backend.dtype: expected one of 'auto', 'float32', 'bfloat16'"):
        build_options(TorchBackend.Options, {"dtype": "fp16"}, "backend")
    with pytest.raises(ConfigError, match="micro_batch_tokens=0 must be at least 1"):
        build_options(TorchBackend.Options, {"micro_batch_tokens": 0}, "backend")
    opts = build_options(TorchBackend.Options, {"betas": "0.9,0.95", "lr": "3e-6"}, "backend")
    assert opts.betas == (0.9, 0.95) and opts.lr == 3e-6
