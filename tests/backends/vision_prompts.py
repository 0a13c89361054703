"""Prompts with images for the vision-language tests of every rollout and backend: real Geometry3K problems
with their diagrams from examples/data (inside the repository), and a tool for the multi-turn loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlcore import Prompt, Tool, ToolResult

GEO = Path(__file__).resolve().parents[2] / "examples" / "data" / "geo3k"


def diagram_prompts(count: int = 3) -> list[Prompt]:
    """The first `count` training problems with their diagrams (different sizes, so prompts differ in length)."""
    from PIL import Image

    rows = [json.loads(line) for line in (GEO / "train.jsonl").read_text().splitlines()][:count]
    return [Prompt(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["problem_text"]}]}],
                   answer=r["answer_value"], id=str(r["id"]), images=[Image.open(GEO / r["image"]).convert("RGB")])
            for r in rows]


class Echo(Tool):
    """A tool that repeats its argument."""

    name = "echo"
    description = "Repeat the text."
    parameters = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}

    def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
        return ToolResult(f"echo: {arguments['text']}")
