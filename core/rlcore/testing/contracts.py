"""Contract checks, one per plugin kind: what the loop relies on, checked on small CPU inputs.

Each `check_*` raises AssertionError naming the broken promise. Built-in plugins run them in rlcore's
test suite; a third-party plugin calls the same function from its own tests.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch

from rlcore.context import Hardware, RunContext
from rlcore.plugins import Registry, instantiate, load
from rlcore.testing.builders import make_batch, make_prompts
from rlcore.types import LossInputs, LossNorm, PolicyLoss, Prompt, RolloutBatch, SamplingParams, Scores, Weights


def make_context(run_dir: Path, model_dir: Path | None = None, hardware: str = "cpu", seed: int = 0) -> RunContext:
    """A RunContext for setting one plugin up alone: the tiny model (built if `model_dir` is None) and
    the named hardware plugin (found through its entry point)."""
    from rlcore import models

    registry = Registry()
    registry.register("hardware", hardware, instantiate(load("hardware", hardware), None, "hardware"))
    spec = models.resolve(str(model_dir) if model_dir else "", run_dir, seed)
    return RunContext(config={}, run_dir=run_dir, model=spec, hardware=Hardware(registry.hook, hardware), seed=seed)


def _norm(batch: RolloutBatch) -> LossNorm:
    return LossNorm.of(batch.response_mask, batch.response_mask.shape[1])


def _loss_on(loss: PolicyLoss, batch: RolloutBatch, logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    norm = _norm(batch)
    inputs = LossInputs(logprobs=logp, advantages=batch.advantages, mask=batch.response_mask,
                        old_logprobs=batch.rollout_logprobs, rollout_logprobs=batch.rollout_logprobs,
                        ref_logprobs=batch.rollout_logprobs if loss.needs_ref_logprobs else None,
                        entropy=torch.ones_like(logp) if loss.needs_entropy else None)
    return loss(inputs, norm)


def check_algorithm(plugin: Any) -> None:
    """advantage is [B, R], finite and zero off the mask, also for all-equal rewards and groups of one;
    the loss is finite with finite gradients, and micro-batches sum to the whole-batch loss."""
    loss = plugin.policy_loss()
    assert isinstance(loss, PolicyLoss), "policy_loss must return a rlcore.PolicyLoss"
    cases = [make_batch(groups=3, n=4, seed=1), make_batch(groups=2, n=4, rewards=[1.0] * 8, seed=2),
             make_batch(groups=3, n=1, seed=3)]
    for batch in cases:
        if loss.needs_ref_logprobs:
            batch.ref_logprobs = batch.rollout_logprobs - 0.1 * batch.response_mask
        adv = plugin.advantage(batch=batch)
        assert adv.shape == batch.response_ids.shape, f"advantage shape {tuple(adv.shape)} != [B, R]"
        assert torch.isfinite(adv).all(), "advantage has NaN/inf"
        assert (adv[batch.response_mask == 0] == 0).all(), "advantage must be 0 outside response_mask"
    batch = cases[0]
    batch.advantages = plugin.advantage(batch=batch)
    logp = (batch.rollout_logprobs + 0.05 * torch.randn_like(batch.rollout_logprobs)).requires_grad_(True)
    whole, metrics = _loss_on(loss, batch, logp)
    assert whole.ndim == 0 and torch.isfinite(whole), f"loss must be a finite scalar, got {whole}"
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values()), "loss metrics must be finite"
    whole.backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all(), "gradients must be finite"
    norm = _norm(batch)
    parts = torch.zeros(())
    for idx in (range(0, 5), range(5, len(batch))):
        sub = batch.select(list(idx))
        inputs = LossInputs(logprobs=logp.detach()[list(idx)], advantages=sub.advantages, mask=sub.response_mask,
                            old_logprobs=sub.rollout_logprobs, rollout_logprobs=sub.rollout_logprobs,
                            ref_logprobs=sub.rollout_logprobs if loss.needs_ref_logprobs else None,
                            entropy=torch.ones_like(sub.rollout_logprobs) if loss.needs_entropy else None)
        parts = parts + loss(inputs, norm)[0]
    assert math.isclose(float(parts), float(whole.detach()), rel_tol=1e-5, abs_tol=1e-6), \
        f"micro-batch losses sum to {float(parts)}, whole batch gives {float(whole)}: normalise by LossNorm"


def check_task(plugin: Any, responses: list[str] | None = None) -> list[Prompt]:
    """dataset('train') is a sized sequence of Prompts with chat messages; score gives one finite reward
    per response and per-sample info."""
    data = plugin.dataset(split="train")
    assert len(data) > 0, "train split is empty"
    prompts = [data[i] for i in range(min(4, len(data)))]
    for p in prompts:
        assert isinstance(p, Prompt), f"dataset items must be rlcore.Prompt, got {type(p).__name__}"
        assert p.messages and all("role" in m and "content" in m for m in p.messages), "messages need role and content"
    batch = make_batch(groups=len(prompts), n=2, seed=4)
    batch.prompts = [p for p in prompts for _ in range(2)]
    batch.texts = (responses or ["", "42", "the answer is 7", "<junk>"]) * len(batch)
    batch.texts = batch.texts[: len(batch)]
    scores = plugin.score(batch=batch)
    assert isinstance(scores, Scores), "score must return rlcore.Scores"
    assert scores.rewards.shape == (len(batch),), f"rewards shape {tuple(scores.rewards.shape)} != [B]"
    assert torch.isfinite(scores.rewards).all(), "rewards must be finite"
    assert len(scores.info) == len(batch), "info needs one dict per sample"
    return prompts


def check_rollout(plugin: Any, ctx: RunContext, prompts: list[Prompt] | None = None) -> RolloutBatch:
    """After setup, sample returns a valid batch of n responses per prompt with logprobs <= 0."""
    plugin.setup(ctx=ctx)
    prompts = prompts or make_prompts(3)
    turns: dict[str, Any] = {"tools": []}
    if "interaction" in inspect.signature(plugin.sample).parameters:  # an optional hook argument
        turns["interaction"] = None
    batch = plugin.sample(prompts=prompts, params=SamplingParams(n=2, max_new_tokens=5, temperature=1.0), **turns)
    assert isinstance(batch, RolloutBatch), "sample must return rlcore.RolloutBatch"
    batch.validate()
    assert len(batch) == 2 * len(prompts), f"expected {2 * len(prompts)} responses, got {len(batch)}"
    assert batch.group_ids.tolist() == [i for i in range(len(prompts)) for _ in range(2)], "group id i for prompt i"
    assert batch.response_ids.shape[1] <= 5, "more tokens than max_new_tokens"
    assert (batch.rollout_logprobs <= 1e-6).all(), "logprobs must be <= 0"
    return batch


def check_backend(plugin: Any, ctx: RunContext, batch: RolloutBatch, loss: PolicyLoss, tmp: Path) -> None:
    """After setup: logprobs are [B, R] and <= 0, update returns finite metrics and changes the weights,
    policy_weights yields named tensors, and save_state/load_state restores the weights."""
    from rlcore.types import UpdatePlan

    plugin.setup(ctx=ctx)
    lp = plugin.logprobs(batch=batch, reference=False)
    assert lp.shape == batch.response_ids.shape and (lp <= 1e-6).all(), "logprobs must be [B, R] and <= 0"
    weights = plugin.policy_weights()
    assert isinstance(weights, Weights), "policy_weights must return rlcore.Weights"
    before = {k: v.detach().clone() for k, v in weights.named_tensors()}
    plugin.save_state(directory=tmp)
    batch.advantages = torch.where(batch.response_mask > 0, torch.randn_like(lp), torch.zeros_like(lp))
    metrics = plugin.update(batch=batch, loss=loss, plan=UpdatePlan())
    assert isinstance(metrics.get("loss"), float) and math.isfinite(metrics["loss"]), "update must report a finite loss"
    after = dict(plugin.policy_weights().named_tensors())
    assert any(not torch.equal(before[k], after[k]) for k in before), "update did not change any weight"
    plugin.load_state(directory=tmp)
    restored = dict(plugin.policy_weights().named_tensors())
    assert all(torch.equal(before[k], restored[k]) for k in before), "load_state did not restore the weights"


def check_hardware(plugin: Any) -> None:
    """Placement answers have the documented types and values."""
    assert isinstance(plugin.hardware_available(), bool)
    assert plugin.collective_backend() in ("gloo", "nccl", "hccl"), "collective backend must be gloo, nccl or hccl"
    assert isinstance(plugin.resource_name(), str) and plugin.resource_name()
    env = plugin.visible_devices_env()
    assert env is None or isinstance(env, str)
    if plugin.hardware_available():
        assert isinstance(plugin.device(local_rank=0), torch.device)
        assert plugin.device_count() >= 1
        stats = plugin.memory_stats()
        assert isinstance(stats, dict) and all(isinstance(v, float) for v in stats.values())
        assert plugin.manual_seed(seed=0) is True
        assert plugin.empty_cache() is True
