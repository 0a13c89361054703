"""Pieces of the multi-turn tool loop: parse hermes tool calls, run them safely, render tool turns.

Whatever goes wrong in a tool call (malformed JSON, an unknown tool, wrong arguments, an exception, a
timeout) becomes error text that the model reads in its next turn and a counted error, never a crash.
"""

from __future__ import annotations

import json
import re
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import attrs

from rlcore import Prompt, Tool, ToolResult
from rlcore.errors import RLCoreError

TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),)}
ASSISTANT_MARK = "rlcore-assistant-turn"
"""Content of the placeholder assistant message whose end `tool_turn_ids` looks for."""


@attrs.define
class ToolCall:
    """One parsed `<tool_call>` block; `error` is set (and nothing runs) when it could not be parsed."""

    name: str = ""
    arguments: dict[str, Any] = attrs.field(factory=dict)
    error: str = ""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The hermes-format calls in an assistant message: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    (arguments may also be a JSON string holding the object); an unclosed last block is parsed too."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            data = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(error=f"the tool call is not valid JSON ({e.msg} at char {e.pos}); write "
                                        '<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>'))
            continue
        args = data.get("arguments", {}) if isinstance(data, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(args, dict):
            calls.append(ToolCall(error='a tool call must be a JSON object {"name": "<tool>", "arguments": '
                                        "{...}} with a string name and an object of arguments"))
            continue
        calls.append(ToolCall(name=data["name"], arguments=args))
    return calls


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


def tool_turn_ids(tokenizer: Any, texts: Sequence[str], end_of_turn: int) -> list[int]:
    """Token ids that follow an assistant turn ended by the token `end_of_turn`: the tool-role messages
    holding `texts`, as the chat template renders them, and the next assistant generation prompt."""
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": ASSISTANT_MARK}]
    text = tokenizer.apply_chat_template(messages + [{"role": "tool", "content": t} for t in texts],
                                         add_generation_prompt=True, tokenize=False)
    end = tokenizer.decode([end_of_turn])
    start = text.find(ASSISTANT_MARK)
    cut = text.find(end, start) if end and start >= 0 else -1
    if cut < 0:
        raise RLCoreError(f"the chat template does not end an assistant turn with {end!r}, the token the model "
                          "stopped on, so tool answers cannot be appended; use a model whose EOS ends its turns")
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
