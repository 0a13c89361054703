"""Supervised warm start (`rlcore warmstart`): fine-tune the policy on the task's worked conversations
before RL, e.g. to teach a tiny model the syntax of a tool call that RL then learns when to make.

The conversations come from the task's `demonstrations` hook; the model's chat template renders them (with
the task's tools offered) and only the assistant turns enter the loss, exactly the tokens a multi-turn
rollout would have the policy generate (up to and including the token that ends each turn). Training goes
through the selected backend's `update` hook with `SupervisedLoss`, so any backend warm-starts; the result
is exported as a transformers model directory for `rlcore run --model`.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcore.context import RunContext
from rlcore.errors import ConfigError, DataError
from rlcore.plugins import Registry
from rlcore.types import LossInputs, LossNorm, PolicyLoss, Prompt, RolloutBatch, UpdatePlan


class SupervisedLoss(PolicyLoss):
    """The mean negative log-likelihood of the loss tokens (the assistant turns) over the mini-batch."""

    def __call__(self, inputs: LossInputs, norm: LossNorm) -> tuple[Tensor, dict[str, Tensor]]:
        nll = -(inputs.logprobs * inputs.mask).sum() / norm.tokens
        return nll, {"nll": nll.detach()}


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=generation_prompt,
                                         tokenize=False)


def conversation_pieces(tokenizer: Any, messages: list[dict[str, Any]],
                        tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[str, bool]]]:
    """The prompt text (the messages before the first assistant turn, with the generation prompt) and the
    response as (text, trained) pieces: each assistant turn up to and including the end-of-turn token is
    trained; what comes between (tool answers, user turns, generation prompts) is not. Text after the last
    assistant turn is dropped. Refuses a chat template whose rendering of a conversation is not a prefix of
    the rendering of its continuation (the rollout appends turns the same way)."""
    full = _render(tokenizer, messages, tools, False)
    eos = tokenizer.eos_token or ""
    prompt, pieces, position = None, [], 0
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:k], tools, True)
        after = _render(tokenizer, messages[:k + 1], tools, False)
        if not (full.startswith(before) and full.startswith(after) and after.startswith(before)):
            raise DataError("the chat template renders a conversation differently from its continuation, so "
                            "its assistant turns cannot be cut out for training; use a template that appends turns")
        end = after.rfind(eos) + len(eos) if eos and after.rfind(eos) >= len(before) else len(after)
        if prompt is None:
            prompt = before
        elif len(before) > position:
            pieces.append((full[position:len(before)], False))
        pieces.append((full[len(before):end], True))
        position = end
    if prompt is None:
        raise DataError("a demonstration has no assistant turn to train on")
    return prompt, pieces


def conversation_batch(tokenizer: Any, conversations: Sequence[list[dict[str, Any]]],
                       tools: list[dict[str, Any]] | None = None) -> RolloutBatch:
    """The conversations as a training batch: the prompt part left-padded, the response right-padded with
    the loss mask on the assistant turns (see `conversation_pieces`); every piece is tokenized on its own,
    as a multi-turn rollout tokenizes each turn."""
    prompts, responses, masks = [], [], []
    for messages in conversations:
        prompt, pieces = conversation_pieces(tokenizer, messages, tools)
        prompts.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids, mask = [], []
        for text, trained in pieces:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [float(trained)] * len(piece)
        responses.append(ids)
        masks.append(mask)
    P, R = max(map(len, prompts)), max(map(len, responses))
    pad = tokenizer.pad_token_id or 0
    B = len(conversations)
    prompt_ids = torch.full((B, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    response_ids = torch.full((B, R), pad, dtype=torch.long)
    attention = torch.zeros((B, R), dtype=torch.long)
    loss_mask = torch.zeros((B, R))
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks)):
        prompt_ids[i, P - len(p):] = torch.tensor(p)
        prompt_mask[i, P - len(p):] = 1
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, :len(r)] = 1
        loss_mask[i, :len(m)] = torch.tensor(m)
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=loss_mask,
        attention_mask=attention, rollout_logprobs=torch.zeros((B, R)), group_ids=torch.arange(B),
        prompts=[Prompt(messages=_before_first_answer(c)) for c in conversations],
        texts=["" for _ in conversations], truncated=torch.zeros(B, dtype=torch.bool),
        advantages=torch.zeros((B, R)))


def _before_first_answer(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    roles = [m.get("role") for m in messages]
    return messages[:roles.index("assistant")] if "assistant" in roles else messages


@attrs.define
class WarmStartResult:
    """What `rlcore warmstart` prints and writes as `warmstart.json`."""

    model: str
    steps: int
    examples: int
    nll_start: float
    nll_end: float
    seconds: float


def warm_start(registry: Registry, ctx: RunContext, out: Path, steps: int, batch_size: int,
               log_every: int = 10, echo: Callable[[str], Any] = print) -> WarmStartResult:
    """Train the registered backend for `steps` optimizer steps on batches of `batch_size` demonstrations drawn
    (seeded by `ctx.seed`) from the task's train split, log `nll` per step to `out/metrics.jsonl`, and export
    the policy to `out/model`. The plugins must be set up."""
    demos = registry.hook.demonstrations(split="train")
    if not demos:
        raise ConfigError(f"task {registry.names.get('task', '?')!r} offers no demonstrations to warm-start on "
                          "(its `demonstrations` hook); choose a task that does, e.g. --task arithmetic")
    tools = [t.schema() for ts in registry.hook.tools() for t in (ts or [])]
    rng = random.Random(ctx.seed)
    loss, nll = SupervisedLoss(), []
    started = time.perf_counter()
    with (out / "metrics.jsonl").open("w") as log:
        for step in range(1, steps + 1):
            picks = [demos[rng.randrange(len(demos))] for _ in range(batch_size)]
            batch = conversation_batch(ctx.model.tokenizer, picks, tools)
            metrics = registry.require("backend", "update", batch=batch, loss=loss, plan=UpdatePlan())
            nll.append(float(metrics["nll"]))
            log.write(json.dumps({"step": step, **metrics}) + "\n")
            if step % log_every == 0 or step == steps:
                echo(f"warmstart step {step}/{steps}: nll {nll[-1]:.4f}")
    checkpoint = out / "checkpoint"
    shutil.rmtree(checkpoint, ignore_errors=True)
    checkpoint.mkdir()
    try:
        registry.call("backend", "save_state", directory=checkpoint)
        model = registry.require("backend", "export_model", checkpoint=checkpoint, out=out / "model",
                                 ctx=ctx)
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    k = min(10, max(1, len(nll) // 2))
    return WarmStartResult(model=str(model), steps=steps, examples=steps * batch_size,
                           nll_start=sum(nll[:k]) / k, nll_end=sum(nll[-k:]) / k,
                           seconds=time.perf_counter() - started)
