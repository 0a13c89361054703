"""Evaluation: sample k answers per test problem with the rollout plugin, score them with the task, and
report pass@k with the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from rich.progress import Progress

from rlcore.errors import ConfigError
from rlcore.plugins import Registry
from rlcore.scoring import check_finite
from rlcore.types import Prompt, RolloutBatch, SamplingParams, Scores


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples, drawn without replacement from n with c correct, is correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@attrs.define
class EvalResult:
    """What `rlcore eval` prints and writes as JSON."""

    split: str
    problems: int
    samples_per_problem: int
    pass_at: dict[str, float]
    reward_mean: float
    reward_errors: int
    seconds: float


def is_correct(info: dict[str, float], reward: float) -> bool:
    """A sample is correct when the task says so (`correct` in its score info), else when its reward is >= 1."""
    return bool(info["correct"] >= 0.5) if "correct" in info else reward >= 1.0 - 1e-6


def turn_inputs(registry: Registry) -> dict[str, Any]:
    """The `tools` and `interaction` arguments of every `sample` call: the tools of every plugin and the
    interaction of the one that offers it. An interaction the selected rollout cannot run stops the run."""
    interaction = registry.hook.interaction()
    if interaction is not None and not registry.accepts("rollout", "sample", "interaction"):
        raise ConfigError(f"the task answers the model between turns (an interaction), which rollout "
                          f"{registry.names.get('rollout', '?')!r} cannot run; choose the hf, vllm or sglang rollout")
    return {"tools": [tool for tools in registry.hook.tools() for tool in (tools or [])], "interaction": interaction}


def evaluate(registry: Registry, prompts: Sequence[Prompt], params: SamplingParams, ks: Sequence[int],
             chunk: int = 32, progress: bool = False,
             on_batch: Callable[[RolloutBatch, Scores], None] | None = None) -> EvalResult:
    """Sample `params.n` responses for each prompt, score them, and compute pass@k for every k in `ks`;
    `on_batch` sees every scored batch (the loop logs a generation table from it)."""
    turns = turn_inputs(registry)
    started = time.perf_counter()
    correct: list[int] = []
    rewards: list[float] = []
    errors = 0
    bar = Progress(transient=True) if progress else None
    task = bar.add_task("evaluating", total=len(prompts)) if bar else None
    if bar:
        bar.start()
    try:
        for i in range(0, len(prompts), chunk):
            part = list(prompts[i:i + chunk])
            batch = registry.require("rollout", "sample", prompts=part, params=params, **turns)
            scores = registry.require("task", "score", batch=batch)
            check_finite(scores.rewards.float(), batch.prompts, registry.names.get("task", "?"), "evaluation")
            if on_batch is not None:
                on_batch(batch, scores)
            infos = scores.info or [{} for _ in range(len(batch))]
            per_problem = [0] * len(part)
            for g, info, r in zip(batch.group_ids.tolist(), infos, scores.rewards.tolist()):
                per_problem[g] += is_correct(info, r)
                rewards.append(r)
                errors += int(info.get("reward_error", 0))
            correct += per_problem
            if bar:
                bar.update(task, advance=len(part))
    finally:
        if bar:
            bar.stop()
    n = params.n
    return EvalResult(split="", problems=len(prompts), samples_per_problem=n,
                      pass_at={f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / max(len(correct), 1)
                               for k in ks},
                      reward_mean=sum(rewards) / max(len(rewards), 1), reward_errors=errors,
                      seconds=time.perf_counter() - started)
