"""The hermes format of Qwen2.5, Qwen3 and NousResearch Hermes models:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one JSON object per block."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from rlcore import Tool, ToolCall, ToolFormat

BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
"""A call block; an unclosed last block (the turn ended inside it) is read too."""
HOW = '<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>'


class Hermes(ToolFormat):
    """JSON calls in `<tool_call>` blocks; `arguments` may also be a JSON string holding the object."""

    name = "hermes"

    def parse(self, text: str, tools: Sequence[Tool]) -> list[ToolCall]:
        """One call per block; a block that is not such a JSON object is an error call naming the problem."""
        return [self._call(body) for body in BLOCK.findall(text)]

    @staticmethod
    def _call(body: str) -> ToolCall:
        try:
            data = json.loads(body)
        except json.JSONDecodeError as e:
            return ToolCall(error=f"the tool call is not valid JSON ({e.msg} at char {e.pos}); write {HOW}")
        args = data.get("arguments", {}) if isinstance(data, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(args, dict):
            return ToolCall(error='a tool call must be a JSON object {"name": "<tool>", "arguments": {...}} with a '
                                  "string name and an object of arguments")
        return ToolCall(name=data["name"], arguments=args)
