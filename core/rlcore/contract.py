"""The hook contract enforced at the core's boundary: what each hook returns is checked where the loop
receives it, cheaply (shapes, dtypes, masks, finiteness, group ids: O(batch x response length), never
O(tokens x vocabulary)), and a breach is a `PluginError` naming the plugin, the hook, what was expected and
what came back, instead of a failure deep in another plugin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rlcore.errors import DataError, PluginError
from rlcore.types import Prompt, RolloutBatch, Scores

LOGPROB_SLACK = 1e-3
"""Logprobs above this are not logprobs (rounding may lift a certain token's 0 a little above it)."""


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


class Contract:
    """Checks the results of one run's hooks; `names` maps a kind to the selected plugin's name."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def _fail(self, kind: str, hook: str, expected: str, got: str) -> PluginError:
        return PluginError(f"{kind} plugin {self.names.get(kind, '?')!r}, hook {hook!r}: expected {expected}; "
                           f"got {got}")

    def _tensor(self, kind: str, hook: str, value: Any, shape: tuple[int, ...], what: str,
                floating: bool = True) -> Tensor:
        if not isinstance(value, Tensor) or tuple(value.shape) != shape or (floating and not value.is_floating_point()):
            raise self._fail(kind, hook, f"{what}: a {'float ' if floating else ''}tensor of shape {list(shape)}",
                             _describe(value))
        return value

    def sample(self, batch: Any, prompts: Sequence[Prompt], n: int) -> RolloutBatch:
        """n responses per prompt, group i answering prompt i, logprobs <= 0 on the loss tokens."""
        if not isinstance(batch, RolloutBatch):
            raise self._fail("rollout", "sample", "a RolloutBatch", _describe(batch))
        try:
            batch.validate()
        except DataError as e:
            raise self._fail("rollout", "sample", "a consistent RolloutBatch", str(e)) from None
        B = len(prompts) * n
        if len(batch) != B:
            raise self._fail("rollout", "sample", f"{n} responses for each of {len(prompts)} prompts ({B})",
                             f"{len(batch)} responses")
        if batch.response_ids.is_floating_point() or batch.group_ids.is_floating_point():
            raise self._fail("rollout", "sample", "integer response_ids and group_ids",
                             f"{batch.response_ids.dtype} and {batch.group_ids.dtype}")
        counts = torch.bincount(batch.group_ids.cpu().clamp(min=0), minlength=len(prompts))
        if int(batch.group_ids.min()) < 0 or len(counts) != len(prompts) or bool((counts != n).any()):
            raise self._fail("rollout", "sample", f"group ids 0..{len(prompts) - 1}, each {n} times",
                             f"counts {counts.tolist()[:16]}")
        mask = batch.response_mask > 0
        if bool((batch.rollout_logprobs.float()[mask] > LOGPROB_SLACK).any()):
            raise self._fail("rollout", "sample", "rollout_logprobs <= 0 on the loss tokens",
                             f"a maximum of {float(batch.rollout_logprobs.float()[mask].max()):.4g}")
        return batch

    def score(self, scores: Any, batch: RolloutBatch) -> Scores:
        """One reward per response (finiteness is the loop's check, which names the prompt) and, if any,
        one info dict per response."""
        if not isinstance(scores, Scores):
            raise self._fail("task", "score", "a Scores", _describe(scores))
        rewards = scores.rewards
        if not isinstance(rewards, Tensor) or tuple(rewards.shape) != (len(batch),):
            raise self._fail("task", "score", f"rewards: a tensor of shape [{len(batch)}]", _describe(rewards))
        if scores.info and (len(scores.info) != len(batch) or not all(isinstance(i, dict) for i in scores.info)):
            raise self._fail("task", "score", f"info: {len(batch)} dicts (or none)", f"{len(scores.info)} entries")
        return scores

    def keep_groups(self, verdict: Any, batch: RolloutBatch, kind: str) -> Tensor:
        """One bool per group id 0..max(group_ids)."""
        groups = int(batch.group_ids.max()) + 1
        verdict = torch.as_tensor(verdict) if isinstance(verdict, (list, tuple)) else verdict
        if not isinstance(verdict, Tensor) or tuple(verdict.shape) != (groups,) or verdict.is_floating_point():
            raise self._fail(kind, "keep_groups", f"a bool tensor of shape [{groups}] (one per group id)",
                             _describe(verdict))
        return verdict.bool()

    def advantage(self, advantages: Any, batch: RolloutBatch) -> Tensor:
        """Finite per-token advantages [B, R], zero outside the loss mask."""
        adv = self._tensor("algo", "advantage", advantages, tuple(batch.response_ids.shape), "advantages [B, R]")
        mask = batch.response_mask.to(adv.device) > 0
        if not bool(torch.isfinite(adv[mask]).all()):
            raise self._fail("algo", "advantage", "finite advantages", "NaN or infinity on a loss token")
        if bool((adv[~mask] != 0).any()):
            raise self._fail("algo", "advantage", "0 outside the loss mask (padding and tool output)",
                             f"{int((adv[~mask] != 0).sum())} non-zero entries there")
        return adv

    def logprobs(self, logprobs: Any, batch: RolloutBatch, reference: bool) -> Tensor:
        """Finite logprobs [B, R], <= 0 on the loss tokens."""
        what = "reference logprobs [B, R]" if reference else "logprobs [B, R]"
        lp = self._tensor("backend", "logprobs", logprobs, tuple(batch.response_ids.shape), what)
        on = lp.float()[batch.response_mask.to(lp.device) > 0]
        if not bool(torch.isfinite(on).all()):
            raise self._fail("backend", "logprobs", f"finite {what}", "NaN or infinity on a loss token")
        if on.numel() and float(on.max()) > LOGPROB_SLACK:
            raise self._fail("backend", "logprobs", f"{what} <= 0 on the loss tokens", f"a maximum of {float(on.max()):.4g}")
        return lp

    def update(self, metrics: Any) -> dict[str, float]:
        """A dict of named numbers (the loop checks the loss for finiteness)."""
        if not isinstance(metrics, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                    for k, v in metrics.items()):
            raise self._fail("backend", "update", "a dict of metric names to numbers", _describe(metrics))
        return metrics

    def policy_weights(self, weights: Any) -> Any:
        """Weights (or a placement's handle on them) that can be synced and snapshotted."""
        if not callable(getattr(weights, "snapshot", None)):
            raise self._fail("backend", "policy_weights", "rlcore.Weights (or a placement's handle with snapshot())",
                             _describe(weights))
        return weights
