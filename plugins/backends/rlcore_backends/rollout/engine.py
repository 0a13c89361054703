"""The engine-agnostic rollout: an `Engine` turns token-id prompts into completions; `run_turns` drives it.

Every rollout plugin (hf, vllm, sglang) wraps its engine in the `Engine` protocol and calls `run_turns`,
which renders the prompts, runs one turn (no tools, no interaction) or the multi-turn loop (tool calls,
interaction replies), and assembles the `RolloutBatch` with `build_batch`. So layout, stop handling, tool
calls, interactions and loss masks are the same whatever engine samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import torch
from torch import Tensor

from rlcore import Interaction, Prompt, RolloutBatch, SamplingParams, Tool, ToolResult
from rlcore.config import check_range
from rlcore.errors import RLCoreError
from rlcore_backends.rollout.multiturn import InteractionRunner, ToolRunner, truncate_text, turn_ids
from rlcore_backends.rollout.toolformats import check_tool_format, tool_format

FINISH_REASONS = ("eos", "stop", "length")


@attrs.define
class Completion:
    """One sampled continuation of one prompt."""

    token_ids: list[int]
    """Generated tokens: up to and including the EOS, or the token that completed a stop string."""
    logprobs: list[float]
    """The engine's logprob of each generated token, of logits / temperature (temperature 1 when greedy)."""
    finish_reason: str
    """"eos" (an EOS token), "stop" (a stop string of `SamplingParams.stop`) or "length" (the token limit)."""


@attrs.define
class TurnOptions:
    """Multi-turn options shared by every rollout plugin built on `run_turns` (subclass it)."""

    max_turns: int = attrs.field(default=4, validator=check_range(1))
    """Assistant turns per sample when the task has tools or an interaction (a turn that calls no tool and
    gets no interaction reply ends the sample)."""
    max_tool_response_tokens: int = attrs.field(default=256, validator=check_range(1))
    """Tool answers longer than this many tokens are cut (and marked as cut) before the model reads them."""
    tool_timeout: float = attrs.field(default=30.0, validator=check_range(0.001))
    """Seconds the tool calls of one turn may take together; a call still running gets a timeout error."""
    tool_format: str = attrs.field(default="hermes", validator=check_tool_format)
    """How the model writes tool calls: `hermes` (Qwen2.5, Qwen3: JSON in `<tool_call>`) or `qwen3_coder`
    (Qwen3-Coder's `<function=...><parameter=...>` XML); packages add more (`rlcore.tool_format` entry points)."""
    max_user_turns: int = attrs.field(default=0, validator=check_range(0))
    """Interaction replies per sample at most (verl's `max_user_turns`); 0: as many as `max_turns` allows."""


class Engine(Protocol):
    """What a rollout plugin's engine does: sample one completion per token-id prompt."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt token list, with `params`' temperature, top-p, max_new_tokens and
        stop strings; `params.n` is ignored (callers repeat a prompt n times for n samples)."""
        ...


def render(tokenizer: Any, prompt: Prompt, tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """Prompt token ids: the chat template with a generation prompt (offering `tools`, else `prompt.tools`),
    or the joined message contents when the tokenizer has no template."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(prompt.messages, tools=tools or prompt.tools or None,
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(str(m["content"]) for m in prompt.messages))["input_ids"]


def stop_token_ids(eos: int | Sequence[int] | None, tokenizer: Any) -> list[int]:
    """The ids that end a response: the model's EOS id(s) from its generation config plus the tokenizer's."""
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return sorted((set(eos) | {tokenizer.eos_token_id}) - {None})


def pad(rows: Sequence[Tensor], value: float, left: bool) -> Tensor:
    """Stack 1-D tensors into [len(rows), max length], padding on the left or the right."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if left:
            out[i, width - len(r):] = r
        else:
            out[i, :len(r)] = r
    return out


def build_batch(prompts: Sequence[Prompt], prompt_ids: list[list[int]], completions: list[Completion],
                tokenizer: Any, params: SamplingParams, n: int, loss_masks: list[list[int]] | None = None,
                info: list[dict[str, Any]] | None = None) -> RolloutBatch:
    """The `RolloutBatch` of n samples per prompt: sample i answers `prompts[i // n]` (group id i // n).

    `prompt_ids` and `completions` hold one entry per sample; `loss_masks` (default all ones) marks the
    response tokens the policy generated; `info` adds per-sample details next to `finish_reason`.
    """
    B = len(prompts) * n
    if not (len(prompt_ids) == len(completions) == B):
        raise RLCoreError(f"build_batch needs {n} samples per prompt: {len(prompts)} prompts, "
                          f"{len(prompt_ids)} prompt id lists, {len(completions)} completions")
    masks = loss_masks or [[1] * len(c.token_ids) for c in completions]
    if any(len(c.token_ids) != len(c.logprobs) or len(c.token_ids) != len(m) for c, m in zip(completions, masks)):
        raise RLCoreError("each completion needs one logprob and one loss-mask entry per token")
    if any(c.finish_reason not in FINISH_REASONS for c in completions):
        raise RLCoreError(f"a completion's finish_reason must be one of {FINISH_REASONS}")
    # An empty response becomes one padding column (masked out), so every tensor is [B, R] with R >= 1.
    responses = [torch.tensor(c.token_ids or [tokenizer.pad_token_id], dtype=torch.long) for c in completions]
    lengths = torch.tensor([len(c.token_ids) for c in completions])
    attention = (torch.arange(max(int(lengths.max()), 1))[None, :] < lengths[:, None]).long()
    loss_mask = pad([torch.tensor(m or [0], dtype=torch.float32) for m in masks], 0.0, left=False)
    prompt_rows = [torch.tensor(p, dtype=torch.long) for p in prompt_ids]
    extra = info or [{} for _ in range(B)]
    return RolloutBatch(
        prompt_ids=pad(prompt_rows, tokenizer.pad_token_id, left=True),
        prompt_mask=pad([torch.ones_like(p) for p in prompt_rows], 0, left=True),
        response_ids=pad(responses, tokenizer.pad_token_id, left=False),
        response_mask=loss_mask, attention_mask=attention,
        rollout_logprobs=pad([torch.tensor(c.logprobs or [0.0], dtype=torch.float32) for c in completions],
                             0.0, left=False),
        group_ids=torch.arange(len(prompts)).repeat_interleave(n),
        prompts=[p for p in prompts for _ in range(n)],
        texts=[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions],
        truncated=torch.tensor([c.finish_reason == "length" for c in completions]),
        temperature=params.temperature if params.temperature > 0 else 1.0,
        info=[{"finish_reason": c.finish_reason, **e} for c, e in zip(completions, extra)],
    )


def run_turns(engine: Engine, tokenizer: Any, prompts: Sequence[Prompt], params: SamplingParams,
              tools: Sequence[Tool] = (), options: TurnOptions | None = None, interaction: Interaction | None = None,
              rendered: Sequence[list[int]] | None = None,
              multimodal: Sequence[dict[str, Tensor]] | None = None) -> RolloutBatch:
    """`params.n` samples per prompt: one engine call without tools and interaction, else the multi-turn loop.

    Multi-turn, each sample alternates assistant turns with the turns that answer them: tool-role turns
    when the assistant turn calls tools (read in `options.tool_format`, executed concurrently across the
    batch), else a user turn from the `interaction` (verl's Interaction: "that's wrong, try again"). Both
    are rendered by the chat template and masked out of the loss. A sample ends when a turn gets no
    answer (no call, no interaction, or the interaction is done), after `options.max_turns` assistant
    turns, or when the response reaches `params.max_new_tokens` tokens, which bounds the whole response
    (all turns). `batch.info[i]` then counts `turns`, `tool_calls`, `tool_errors` (failed calls, answered
    with error text the model reads) and sums the tools' step rewards as `tool_reward`; `messages` holds
    the response's turns as chat messages. With an interaction it also holds `user_turns`, `turn_rewards`
    (one per reply), `interaction_reward` (their sum), `interaction_score` (the final score) and
    `interaction_errors`.

    Vision-language prompts come `rendered` (token ids per prompt, image tokens included) with their
    `multimodal` inputs (one dict per prompt): each `engine.generate` call then gets the inputs of its rows
    as `multimodal=`, and the batch keeps them per sample.
    """
    prompts = list(prompts)
    options = options or TurnOptions()
    mm = [m for m in multimodal for _ in range(params.n)] if multimodal is not None else None
    if not tools and interaction is None:
        prompt_ids = [list(rendered[k]) if rendered is not None else render(tokenizer, p)
                      for k, p in enumerate(prompts) for _ in range(params.n)]
        extra = {"multimodal": mm} if mm is not None else {}
        batch = build_batch(prompts, prompt_ids, engine.generate(prompt_ids, params, **extra), tokenizer, params,
                            params.n)
        batch.multimodal = mm
        return batch
    if not tokenizer.chat_template:
        raise RLCoreError("multi-turn rollouts (tool calls, interactions) need a tokenizer with a chat template "
                          "(to render the turns); use a chat model or a single-turn task")
    schemas = [t.schema() for t in tools]
    prompt_ids = [list(rendered[k]) if rendered is not None else render(tokenizer, p, p.tools or schemas)
                  for k, p in enumerate(prompts) for _ in range(params.n)]
    samples = [_Sample(p) for p in prompts for _ in range(params.n)]
    calls = tool_format(options.tool_format) if tools else None
    runner = ToolRunner(tools, timeout=options.tool_timeout)
    talk = InteractionRunner(interaction) if interaction is not None else None
    try:
        if talk is not None:
            for i, sample in enumerate(samples):
                sample.talking = talk.start(i, sample.prompt)
                sample.interaction_errors += not sample.talking
        active = list(range(len(samples)))
        for turn in range(options.max_turns):
            budgets = [params.max_new_tokens - len(samples[i].tokens) for i in active]
            seed = None if params.seed is None else params.seed + turn * len(samples)  # fresh seeds every turn
            extra = {"multimodal": [mm[i] for i in active]} if mm is not None else {}
            outs = engine.generate([prompt_ids[i] + samples[i].tokens for i in active],
                                   attrs.evolve(params, n=1, max_new_tokens=max(budgets), seed=seed,
                                                min_new_tokens=min(params.min_new_tokens, max(budgets))), **extra)
            calling, replying = [], []
            for i, budget, out in zip(active, budgets, outs):
                sample, tokens = samples[i], out.token_ids[:budget]
                sample.add(tokens, out.logprobs[:budget], loss=1)
                sample.finish = "length" if len(out.token_ids) > budget else out.finish_reason
                sample.turns += 1
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                sample.messages.append({"role": "assistant", "content": text})
                if sample.finish != "eos" or turn + 1 == options.max_turns:
                    continue
                sample.calls = calls.parse(tokenizer.decode(tokens), tools) if calls is not None else []
                if sample.calls:
                    calling.append(i)
                elif sample.talking and (not options.max_user_turns or sample.user_turns < options.max_user_turns):
                    replying.append(i)
            answers = _tool_answers(tokenizer, samples, runner.run([(samples[i].prompt, i, samples[i].calls)
                                                                    for i in calling]), options)
            if talk is not None:
                answers.update(_interaction_answers(talk, samples, replying))
            active = []
            for i in sorted(answers):
                sample = samples[i]
                ids = turn_ids(tokenizer, answers[i], end_of_turn=sample.tokens[-1])
                room = params.max_new_tokens - len(sample.tokens)
                sample.add(ids[:room], [0.0] * min(len(ids), room), loss=0)
                sample.messages += answers[i]
                if len(ids) >= room:
                    sample.finish = "length"
                else:
                    active.append(i)
            if not active:
                break
        if talk is not None:
            for i, sample in enumerate(samples):
                score = talk.score(i) if sample.talking else None
                sample.interaction_score = score or 0.0
                sample.interaction_errors += sample.talking and score is None
    finally:
        runner.close()
        if talk is not None:
            talk.close()
    completions = [Completion(s.tokens, s.logprobs, s.finish) for s in samples]
    batch = build_batch(prompts, prompt_ids, completions, tokenizer, params, params.n,
                        loss_masks=[s.loss_mask for s in samples], info=[s.info(talk is not None) for s in samples])
    batch.multimodal = mm
    return batch


def _tool_answers(tokenizer: Any, samples: list[_Sample], results: dict[int, list[ToolResult]],
                  options: TurnOptions) -> dict[int, list[dict[str, Any]]]:
    """The tool-role messages answering each calling sample (texts cut to `max_tool_response_tokens`),
    counted into the samples' tool statistics."""
    answers = {}
    for i, done in results.items():
        sample = samples[i]
        sample.tool_calls += len(done)
        sample.tool_errors += sum(r.error for r in done)
        sample.tool_reward += sum(r.reward for r in done)
        answers[i] = [{"role": "tool", "content": truncate_text(tokenizer, r.text, options.max_tool_response_tokens)}
                      for r in done]
    return answers


def _interaction_answers(talk: InteractionRunner, samples: list[_Sample],
                         replying: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The user turns the interaction answers with (none for a sample it ends), its rewards recorded."""
    answers = {}
    for i in replying:
        sample = samples[i]
        reply = talk.respond(i, sample.prompt.messages + sample.messages)
        if reply is None:
            sample.interaction_errors += 1
            continue
        sample.user_turns += 1
        sample.turn_rewards.append(float(reply.reward))
        if not reply.done:
            answers[i] = [{"role": "user", "content": reply.text}]
    return answers


@attrs.define
class _Sample:
    """One sample's response as it grows over turns."""

    prompt: Prompt
    tokens: list[int] = attrs.field(factory=list)
    logprobs: list[float] = attrs.field(factory=list)
    loss_mask: list[int] = attrs.field(factory=list)
    messages: list[dict[str, Any]] = attrs.field(factory=list)
    finish: str = "length"
    calls: list[Any] = attrs.field(factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_reward: float = 0.0
    talking: bool = False
    user_turns: int = 0
    turn_rewards: list[float] = attrs.field(factory=list)
    interaction_score: float = 0.0
    interaction_errors: int = 0

    def add(self, tokens: list[int], logprobs: list[float], loss: int) -> None:
        """Append tokens with their logprobs; `loss` 1 for policy tokens, 0 for tool and interaction turns."""
        self.tokens += tokens
        self.logprobs += logprobs
        self.loss_mask += [loss] * len(tokens)

    def info(self, interaction: bool) -> dict[str, Any]:
        """The per-sample details `run_turns` reports (see there)."""
        out: dict[str, Any] = {"turns": self.turns, "tool_calls": self.tool_calls, "tool_errors": self.tool_errors,
                               "tool_reward": self.tool_reward, "messages": self.messages}
        if interaction:
            out.update(user_turns=self.user_turns, turn_rewards=self.turn_rewards,
                       interaction_reward=sum(self.turn_rewards), interaction_score=self.interaction_score,
                       interaction_errors=self.interaction_errors)
        return out
