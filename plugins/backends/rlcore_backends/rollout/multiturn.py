"""Pieces of the multi-turn loop: run tool calls safely, render the turns that answer the model.

Whatever goes wrong in a tool call (a malformed call, an unknown tool, wrong arguments, an exception, a
timeout) becomes error text that the model reads in its next turn and a counted error, never a crash.
Calls are read from the model's text by a tool-call format (`toolformats`).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

from rlcore import Interaction, InteractionTurn, Prompt, Tool, ToolCall, ToolResult
from rlcore.errors import RLCoreError

JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),)}
ASSISTANT_MARK = "rlcore-assistant-turn"
"""Content of the placeholder assistant message whose end `turn_ids` looks for."""


def argument_errors(parameters: dict[str, Any], arguments: dict[str, Any]) -> list[str]:
    """What is wrong with `arguments` under a tool's JSON-schema `parameters`: missing required keys, unknown
    keys (when `additionalProperties` is false), and property types and enums (one level deep)."""
    props = parameters.get("properties", {})
    errors = [f"missing required argument '{k}'" for k in parameters.get("required", []) if k not in arguments]
    for key, value in arguments.items():
        spec = props.get(key)
        if spec is None:
            if parameters.get("additionalProperties", True) is False:
                errors.append(f"unknown argument '{key}' (expected: {', '.join(props) or 'none'})")
            continue
        types = spec.get("type")
        types = [types] if isinstance(types, str) else types or []
        known = [JSON_TYPES[t] for t in types if t in JSON_TYPES]
        bad_bool = isinstance(value, bool) and "boolean" not in types
        if known and (bad_bool or not any(isinstance(value, k) for k in known)):
            errors.append(f"argument '{key}' must be {' or '.join(types)}, got {type(value).__name__}")
        elif "enum" in spec and value not in spec["enum"]:
            errors.append(f"argument '{key}' must be one of {spec['enum']}, got {value!r}")
    return errors


def truncate_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens, marked as cut so the model knows it saw only part."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens]) + "...(truncated)"


def turn_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], end_of_turn: int) -> list[int]:
    """Token ids that follow an assistant turn ended by the token `end_of_turn`: `messages` (tool answers,
    or a user turn from an interaction) as the chat template renders them, and the next assistant
    generation prompt."""
    placeholder = [{"role": "user", "content": "?"}, {"role": "assistant", "content": ASSISTANT_MARK}]
    text = tokenizer.apply_chat_template(placeholder + list(messages), add_generation_prompt=True, tokenize=False)
    end = tokenizer.decode([end_of_turn])
    start = text.find(ASSISTANT_MARK)
    cut = text.find(end, start) if end and start >= 0 else -1
    if cut < 0:
        raise RLCoreError(f"the chat template does not end an assistant turn with {end!r}, the token the model "
                          "stopped on, so the next turn cannot be appended; use a model whose EOS ends its turns")
    return tokenizer(text[cut + len(end):], add_special_tokens=False)["input_ids"]


class ToolRunner:
    """Executes the tool calls of a batch concurrently (one daemon thread per sample, its calls in order),
    keeping one instance per sample and tool from `Tool.create` until `close`.

    Daemon threads rather than an executor: a tool stuck past the timeout must not block the
    interpreter's exit; its sample gets a timeout error and the run goes on.
    """

    def __init__(self, tools: Sequence[Tool], timeout: float) -> None:
        self.tools = {t.name: t for t in tools}
        self.timeout = timeout
        self.instances: dict[tuple[int, str], Any] = {}

    def run(self, jobs: Sequence[tuple[Prompt, int, list[ToolCall]]]) -> dict[int, list[ToolResult]]:
        """For each (prompt, sample key, calls): one result per call, in order; all jobs run at once."""
        results: dict[int, list[ToolResult]] = {key: [] for _, key, _ in jobs}
        threads = [threading.Thread(target=self._run_calls, args=(prompt, key, calls, results[key]), daemon=True)
                   for prompt, key, calls in jobs]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        out = {}
        for _, key, calls in jobs:
            done = list(results[key])
            out[key] = done + [ToolResult(f"Error: tool '{c.name}' timed out after {self.timeout:g} s",
                                          error=True) for c in calls[len(done):]]
        return out

    def close(self) -> None:
        """Release every instance made by `create` (a failing release is warned about, not raised)."""
        for (_, name), instance in self.instances.items():
            try:
                self.tools[name].release(instance)
            except Exception as e:  # noqa: BLE001 - a tool's bug must not end the run
                warnings.warn(f"tool '{name}' failed to release an instance: {e!r}", stacklevel=2)
        self.instances.clear()

    def _run_calls(self, prompt: Prompt, key: int, calls: list[ToolCall], out: list[ToolResult]) -> None:
        for call in calls:
            out.append(self._call(prompt, key, call))

    def _call(self, prompt: Prompt, key: int, call: ToolCall) -> ToolResult:
        """One call: parse errors, unknown tools, bad arguments and exceptions become error results."""
        if call.error:
            return ToolResult(f"Error: {call.error}", error=True)
        tool = self.tools.get(call.name)
        if tool is None:
            return ToolResult(f"Error: unknown tool '{call.name}'; available tools: {', '.join(self.tools)}",
                              error=True)
        problems = argument_errors(tool.parameters, call.arguments)
        if problems:
            return ToolResult(f"Error: wrong arguments for '{call.name}': {'; '.join(problems)}", error=True)
        try:
            if (key, call.name) not in self.instances:
                self.instances[(key, call.name)] = tool.create(prompt)
            result = tool.execute(self.instances[(key, call.name)], call.arguments)
            return result if isinstance(result, ToolResult) else ToolResult(str(result))
        except Exception as e:  # noqa: BLE001 - a tool's bug becomes text the model reads
            return ToolResult(f"Error: tool '{call.name}' failed: {type(e).__name__}: {e}", error=True)


class InteractionRunner:
    """A task's interaction over the samples of one rollout: an instance per sample from `Interaction.start`,
    replies, final scores, and every instance released at `close`.

    An interaction that raises (a bug in task code) or answers something other than an `InteractionTurn`
    ends that sample's conversation and is counted (`interaction_errors`), with a warning, never a crash.
    """

    def __init__(self, interaction: Interaction) -> None:
        self.interaction = interaction
        self.instances: dict[int, Any] = {}
        self.warned = False

    def start(self, key: int, prompt: Prompt) -> bool:
        """Start sample `key`'s instance; False when `start` failed."""
        try:
            self.instances[key] = self.interaction.start(prompt)
        except Exception as e:  # noqa: BLE001 - a task's bug must not end the run
            self._warn("start", e)
            return False
        return True

    def respond(self, key: int, messages: list[dict[str, Any]]) -> InteractionTurn | None:
        """The reply to sample `key`'s conversation so far, or None when the interaction failed."""
        try:
            reply = self.interaction.respond(self.instances[key], messages)
            if not isinstance(reply, InteractionTurn):
                raise TypeError(f"respond returned {type(reply).__name__}, not rlcore.InteractionTurn")
            return reply
        except Exception as e:  # noqa: BLE001
            self._warn("respond", e)
            return None

    def score(self, key: int) -> float | None:
        """Sample `key`'s final score, or None when the interaction failed to give one."""
        try:
            return float(self.interaction.score(self.instances[key]))
        except Exception as e:  # noqa: BLE001
            self._warn("score", e)
            return None

    def close(self) -> None:
        """Release every instance (a failing release is warned about, not raised)."""
        for instance in self.instances.values():
            try:
                self.interaction.release(instance)
            except Exception as e:  # noqa: BLE001
                self._warn("release", e)
        self.instances.clear()

    def _warn(self, method: str, error: Exception) -> None:
        if not self.warned:
            warnings.warn(f"interaction '{self.interaction.name or type(self.interaction).__name__}' failed in "
                          f"{method}: {type(error).__name__}: {error} (further failures are counted silently)",
                          stacklevel=3)
            self.warned = True
