"""A scripted `Engine` for multi-turn tests: canned assistant turns instead of a model, so parsing, rendering
by the chat template, loss masks and limits run for real without sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlcore import SamplingParams
from rlcore_backends.rollout.engine import Completion

LOGPROB = -0.25
"""The logprob the scripted engine reports for every generated token."""
CHAT_TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"


class ScriptedEngine:
    """Answers turn t of the sample whose user question is `key` with `script[key][t]` plus <|im_end|>.

    Records every context it was given, so tests can compare it with the chat template's rendering.
    """

    def __init__(self, tok: Any, script: dict[str, list[str]], end: str = "<|im_end|>") -> None:
        self.tok, self.script, self.end = tok, script, end
        self.contexts: list[list[int]] = []
        self.calls: list[SamplingParams] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.calls.append(params)
        out = []
        for ids in prompts:
            self.contexts.append(list(ids))
            text = self.tok.decode(ids)
            key = next(k for k in self.script if f"<|im_start|>user\n{k}<|im_end|>" in text)
            turn = text.count("<|im_start|>assistant") - 1
            reply = self.tok(self.script[key][turn] + self.end, add_special_tokens=False)["input_ids"]
            reason = "eos" if len(reply) <= params.max_new_tokens else "length"
            reply = reply[:params.max_new_tokens]
            out.append(Completion(reply, [LOGPROB] * len(reply), reason))
        return out
