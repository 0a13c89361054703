"""The hook contract: every capability of a run is one of these hooks, implemented by the selected plugin.

A run registers exactly one plugin of each kind (algo, backend, rollout, task, hardware) plus the
`tracker` plugins that `trainer.log_to` selects and every installed `extra` plugin. Hooks marked *first result* return the answer of the one implementation that
answers (not None); the others are *collected* into a list. Implementations may accept a subset of the
arguments (pluggy passes only those they name), so new arguments can be added without breaking plugins.

Before anything starts (`rlcore run --dry-run` too), every selected plugin may settle its `auto` options
(`settle_options`) and refuse the combination through `check_run` (see `rlcore.preflight`). One step of the
loop, in order:
    prompts = task.dataset("train")[...]                        (the core batches and shuffles)
    batch   = rollout.sample(prompts, params, tools, interaction)
    scores  = task.score(batch)                                  -> batch.rewards
    keep    = all(plugin.keep_groups(batch))                     (drop groups; the core samples again)
    loss    = algo.policy_loss()
    batch.ref_logprobs = backend.logprobs(batch, reference=True) (only if loss.needs_ref_logprobs)
    batch.advantages   = algo.advantage(batch)
    metrics = backend.update(batch, loss, plan)
    rollout.sync_weights(backend.policy_weights())
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from rlcore.context import RunContext
    from rlcore.types import (Interaction, PolicyLoss, Prompt, RolloutBatch, SamplingParams, Scores, Tool, UpdatePlan,
                              Weights)

hookspec = pluggy.HookspecMarker("rlcore")
hookimpl = pluggy.HookimplMarker("rlcore")


# ---- lifecycle: any plugin -------------------------------------------------------------------------

@hookspec
def setup(ctx: RunContext) -> None:
    """Any plugin, collected. Called once before the first step, in the order hardware, backend,
    rollout, task, algo, extras: load models, start engines, read options. `ctx` holds the resolved
    config, run directory, model spec (path + tokenizer), seed and the hardware facade."""


@hookspec
def teardown() -> None:
    """Any plugin, collected. Called once at the end of a run, also after an error: stop engines and
    processes, close files."""


@hookspec
def save_state(directory: Path) -> None:
    """Any plugin, called for each plugin alone with its own empty directory inside the checkpoint
    being written (`<ckpt>/<kind>`): write whatever is needed to resume (model, optimizer, scheduler,
    data position). The core makes the whole checkpoint atomic."""


@hookspec
def load_state(directory: Path) -> None:
    """Any plugin, called for each plugin alone with the directory its `save_state` wrote, after
    `setup` and before the first resumed step."""


@hookspec
def log_metrics(step: int, metrics: dict[str, float]) -> None:
    """Any plugin, collected. Called after every step with that step's metrics (already written to
    `metrics.jsonl`): experiment trackers implement it. The resolved config is `ctx.config` in `setup`; a
    tracker keeps what it needs to resume into the same run in `save_state` / `load_state`."""


@hookspec
def log_generations(step: int, split: str, rows: list[dict[str, Any]]) -> None:
    """Any plugin, collected. Called every `trainer.generations_every` steps (`split` "train") and after
    every evaluation ("eval") with a few of the step's samples, already written to `generations.jsonl`:
    one dict per sample with `prompt`, `response`, `reward`, `finish_reason`, `tool_calls` and the
    task's per-sample score details (`rlcore.generations.table` turns them into columns and rows)."""


@hookspec
def step_metrics() -> dict[str, float]:
    """Any plugin, collected and merged. Called at the end of every step, before metrics are written:
    numbers the plugin measured during the step (advantage statistics, KL coefficient, cache hits)."""


# ---- checks before a run: any plugin ---------------------------------------------------------------

@hookspec
def modalities() -> list[str]:
    """Any plugin (usually the task), collected and merged. What this run's prompts carry besides text, e.g.
    `["image"]` for a task whose prompts have images: the other plugins' `check_run` receives the union and
    refuses what it cannot take. Called on fresh instances, before `setup`; must not load data."""


@hookspec
def check_run(config: dict[str, Any], model_config: Any, modalities: frozenset[str]) -> list[str] | None:
    """Any plugin, collected. Refuse a run this plugin cannot do, before anything starts: called by
    `rlcore run --dry-run` and again at the start of a run (before any `setup`), on fresh instances of the
    selected plugins (options set, nothing loaded or started; see `rlcore.preflight`). `config` is the
    resolved config as plain values (what config.yaml holds), `model_config` the model's transformers config
    (`AutoConfig`: model_type, sizes, `vision_config` for a vision-language model; no weights), or None when
    it cannot be read here (a hub id without network), `modalities` the union of every plugin's `modalities`.
    Return one line per problem, naming it and the fix (e.g. "backend megatron: model_type 'qwen2_5_vl' ...;
    use --backend fsdp"), or nothing. The run stops with them all (exit 2) before any plugin starts."""


@hookspec
def settle_options(config: dict[str, Any], model_config: Any) -> dict[str, dict[str, Any]] | None:
    """Any plugin, collected. Replace the plugin's `auto` option values by what they stand for on this machine
    (a measured precision), so that config.yaml says what runs: called by `rlcore run` on fresh instances,
    as `check_run`, after the config is resolved and before `--dry-run` prints it or config.yaml is written.
    Return `{section: {option: value}}` (merged into the config, which is validated again), or nothing."""


# ---- placement -----------------------------------------------------------------------------------

@hookspec(firstresult=True)
def place(kind: str, name: str, cls: type, options: Any) -> Any:
    """Placement, first result. Called once per selected plugin of the other kinds, before any `setup`:
    return the object to register for it — the instance `cls(options)` (local placement), or a proxy
    whose hook implementations forward to an instance running elsewhere (Ray actors). `options` is the
    typed options instance, or None for a plugin that declares none."""


# ---- task ---------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def dataset(split: str) -> Sequence[Prompt]:
    """Task, first result. The problems of `split` ("train" or "test") as a sized, indexable sequence
    of `Prompt`s. Called once per split; the core shuffles and batches (and records the position for
    resuming), so a procedural task may return a lazy sequence."""


@hookspec(firstresult=True)
def score(batch: RolloutBatch) -> Scores:
    """Task, first result. Called after `sample`: one reward per response (from `batch.texts`,
    `batch.prompts[i].answer`, `batch.info`). A reward function that raises must not stop the run:
    use `rlcore.scoring.score_each`, which scores 0 and counts the error. After a multi-turn rollout,
    `batch.texts[i]` is the whole response as the chat template renders it (tool turns included) and
    `batch.info[i]` holds `turns`, `tool_calls`, `tool_errors` and `tool_reward` (the sum of the tools'
    step rewards), and `messages`, the response's turns as chat messages (assistant text, tool and user
    answers); with an interaction also `user_turns`, `turn_rewards` (one per interaction reply),
    `interaction_reward` (their sum) and `interaction_score` (its final `score`). Whether tool or
    interaction rewards enter the reward is the task's choice."""


@hookspec
def tools() -> list[Tool]:
    """Any plugin (usually the task), collected and concatenated. Tools offered to the model in
    multi-turn rollouts; an empty list means single-turn."""


@hookspec(firstresult=True)
def interaction() -> Interaction | None:
    """Any plugin (usually the task), first result. The simulated user that answers assistant turns
    calling no tool (e.g. "that's wrong, try again"), making the rollout multi-turn; None for none."""


@hookspec(firstresult=True)
def demonstrations(split: str) -> Sequence[list[dict[str, Any]]] | None:
    """Task, first result. Worked conversations for `rlcore warmstart` (supervised fine-tuning before
    RL): each a list of chat messages, the prompt's then the target assistant turns (OpenAI style, with
    `tool_calls` and `tool` answers for tool use), rendered by the model's chat template with the task's
    tools offered; only assistant turns are trained on. None when the task has none."""


# ---- rollout -------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def sample(prompts: Sequence[Prompt], params: SamplingParams, tools: Sequence[Tool],
           interaction: Interaction | None) -> RolloutBatch:
    """Rollout, first result. Generate `params.n` responses per prompt; responses of prompt i get
    group id i. Returns token ids, the engine's logprob of every sampled token (of logits divided by
    the temperature), the loss mask (tool output and interaction turns masked out), decoded texts and
    truncation flags. With `tools` or an `interaction` the rollout is multi-turn; a rollout that cannot
    run an interaction must not name the argument (the core then refuses the run)."""


@hookspec(firstresult=True)
def sync_weights(weights: Weights) -> dict[str, float] | None:
    """Rollout, first result. Called after every update with the backend's `policy_weights()`: load
    them into the engine (in process, by reload, or adapters only). Returns timing metrics."""


# ---- algorithm -----------------------------------------------------------------------------------

@hookspec(firstresult=True)
def advantage(batch: RolloutBatch) -> Tensor:
    """Algorithm, first result. Called after `score` (and reference logprobs, if the loss needs them):
    per-token advantages [B, R] from `batch.rewards` and `batch.group_ids`, zero outside the mask.
    Reward shaping (overlong penalty, KL-in-reward) happens here too. It may narrow
    `batch.response_mask` (never widen it, e.g. to drop truncated responses); the loss and `LossNorm`
    use the mask as it is after this hook."""


@hookspec(firstresult=True)
def policy_loss() -> PolicyLoss:
    """Algorithm, first result. The loss the backend minimises, as a callable on local tensors plus
    global counts (see `PolicyLoss`), so it runs unchanged inside any backend."""


@hookspec
def keep_groups(batch: RolloutBatch) -> Tensor | None:
    """Any plugin (usually the algorithm), collected. A bool tensor with one entry per group id
    (0..num_groups-1): False drops that group from training. The core samples more prompts until the
    batch is full or `trainer.max_resample_rounds` is reached (DAPO's dynamic sampling)."""


# ---- backend -------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def logprobs(batch: RolloutBatch, reference: bool) -> Tensor:
    """Backend, first result. Per-token logprobs [B, R] of the responses under the current policy, or
    under the frozen reference model when `reference` (loaded only if the loss needs it)."""


@hookspec(firstresult=True)
def update(batch: RolloutBatch, loss: PolicyLoss, plan: UpdatePlan) -> dict[str, float]:
    """Backend, first result. Train on the batch: `plan.epochs` passes over `plan.mini_batches`
    mini-batches, one optimizer step each, micro-batched as the backend's options say. Returns
    metrics (loss, grad norm, lr, the loss's own metrics, tokens/s)."""


@hookspec(firstresult=True)
def policy_weights() -> Weights:
    """Backend, first result. The current policy weights for `sync_weights` and export."""


@hookspec(firstresult=True)
def export_model(checkpoint: Path, out: Path, ctx: RunContext) -> Path:
    """Backend, first result. Called by `rlcore export` (no `setup` before it): write the policy saved
    in `checkpoint` (the directory this backend's `save_state` wrote) to `out` as a transformers model
    directory that `AutoModelForCausalLM.from_pretrained` loads, LoRA adapters merged. `ctx` gives the
    base model and tokenizer. Returns `out`."""


@hookspec(firstresult=True)
def convert_checkpoint(source: Path, out: Path, to: str, ctx: RunContext) -> Path:
    """Backend, first result. Called by `rlcore convert`: convert model weights between the Hugging Face
    layout (`to="native"`: HF directory -> this backend's own format, e.g. Megatron's sharded
    checkpoint) and back (`to="hf"`). Returns `out`."""


# ---- hardware ------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def hardware_available() -> bool:
    """Hardware, first result. Whether this machine has the device (used by `--hardware auto`)."""


@hookspec(firstresult=True)
def device(local_rank: int) -> torch.device:
    """Hardware, first result. The torch device a process of this local rank computes on."""


@hookspec(firstresult=True)
def device_count() -> int:
    """Hardware, first result. Devices visible on this node."""


@hookspec(firstresult=True)
def collective_backend() -> str:
    """Hardware, first result. The torch.distributed backend: gloo, nccl or hccl."""


@hookspec(firstresult=True)
def visible_devices_env() -> str | None:
    """Hardware, first result. The variable that restricts visible devices (CUDA_VISIBLE_DEVICES, ...)."""


@hookspec(firstresult=True)
def resource_name() -> str:
    """Hardware, first result. The resource a distributed engine schedules on ("GPU", "NPU", "CPU")."""


@hookspec(firstresult=True)
def memory_stats() -> dict[str, float]:
    """Hardware, first result. Memory in use and peak, in GiB, for the metrics."""


@hookspec(firstresult=True)
def empty_cache() -> bool:
    """Hardware, first result. Release cached device memory; returns True when done."""


@hookspec(firstresult=True)
def manual_seed(seed: int) -> bool:
    """Hardware, first result. Seed the device's random generators; returns True when done."""


def all_hook_names() -> list[str]:
    """Names of every hook in this contract (for docs and contract tests)."""
    import inspect
    import sys

    mod = sys.modules[__name__]
    return [n for n, f in inspect.getmembers(mod, inspect.isfunction)
            if getattr(f, "rlcore_spec", None) is not None]

