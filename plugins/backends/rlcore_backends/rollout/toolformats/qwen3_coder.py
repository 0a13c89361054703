"""The XML format of Qwen3-Coder: a `<function=NAME>` block per call, one `<parameter=KEY>` block per argument,
values as plain text typed by the tool's JSON schema (its chat template writes them unquoted).

    <tool_call>
    <function=calculator>
    <parameter=expression>
    12 * (3 + 4)
    </parameter>
    </function>
    </tool_call>
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from rlcore import Tool, ToolCall, ToolFormat

BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>|$)", re.DOTALL)
PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)
INTEGER = re.compile(r"-?\d+")
HOW = "<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>"


def typed(value: str, spec: dict[str, Any]) -> Any:
    """`value` as the first JSON-schema type of `spec` it reads as (string last); unchanged when none fits,
    so the argument check tells the model what was expected."""
    types = spec.get("type") or []
    types = [types] if isinstance(types, str) else list(types)
    for t in sorted(types, key=lambda t: t == "string"):
        text = value.strip()
        if t == "string":
            return value
        if t == "integer" and INTEGER.fullmatch(text):
            return int(text)
        if t == "number":
            try:
                number = float(text)
            except ValueError:
                continue
            return int(text) if INTEGER.fullmatch(text) else number
        if t == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if t == "null" and text.lower() in ("null", "none"):
            return None
        if t in ("object", "array"):
            try:
                parsed = json.loads(text)
            except (ValueError, RecursionError):
                continue
            if isinstance(parsed, dict if t == "object" else list):
                return parsed
    return value


class Qwen3Coder(ToolFormat):
    """`<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...</function></tool_call>` blocks."""

    name = "qwen3_coder"

    def parse(self, text: str, tools: Sequence[Tool]) -> list[ToolCall]:
        """One call per block; a block without a function, or naming a parameter twice, is an error call."""
        schemas = {t.name: t.parameters.get("properties", {}) for t in tools}
        return [self._call(body, schemas) for body in BLOCK.findall(text)]

    @staticmethod
    def _call(body: str, schemas: dict[str, dict[str, Any]]) -> ToolCall:
        function = FUNCTION.search(body)
        if function is None:
            return ToolCall(error=f"a tool call must hold one <function=NAME> block; write {HOW}")
        name = function.group(1).strip()
        properties = schemas.get(name, {})
        arguments: dict[str, Any] = {}
        for key, raw in PARAMETER.findall(function.group(2)):
            key = key.strip()
            if key in arguments:
                return ToolCall(error=f"parameter '{key}' is given twice in the call to '{name}'")
            value = raw[1:] if raw.startswith("\n") else raw  # the template puts the value on lines of its own
            value = value[:-1] if value.endswith("\n") else value
            arguments[key] = typed(value, properties.get(key, {}))
        return ToolCall(name=name, arguments=arguments)
