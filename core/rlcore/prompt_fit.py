"""Prompts must fit the model's context: prompt tokens + `sampling.max_new_tokens` <= its positions.

A prompt that does not fit stops the run with one line naming it, or, with
`trainer.filter_overlong_prompts=true` (verl's `data.filter_overlong_prompts`), is left out. Counting a
prompt's tokens renders it with the chat template as the rollout does; a prompt whose text is so short
that it fits even at one token per byte is not rendered, so checking a dataset costs little.
Image tokens are not counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from rlcore.errors import ConfigError, DataError
from rlcore.types import Prompt

log = logging.getLogger("rlcore")

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
SLACK_PER_MESSAGE = 2
"""Tokens a message's text may merge into across its template boundaries, on top of one per byte."""


def model_context(model_path: str) -> tuple[int, str] | None:
    """The model's context length in positions and the config key it came from (None when the config
    names none, or cannot be read here)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - a model whose config this cannot read is checked by its loader
        return None
    for part in (config, getattr(config, "text_config", None)):
        for key in CONTEXT_KEYS:
            value = getattr(part, key, None)
            if isinstance(value, int) and value > 0:
                return value, key
    return None


class PromptFit:
    """Whether prompts leave `max_new_tokens` of room in a context of `context` positions."""

    def __init__(self, tokenizer: Any, context: int, context_key: str, max_new_tokens: int,
                 tools: Sequence[Any] = ()) -> None:
        self.tokenizer = tokenizer
        self.context, self.context_key = context, context_key
        self.max_new_tokens = max_new_tokens
        self.limit = context - max_new_tokens
        self._overheads: dict[tuple[str, ...], int] = {}
        self.use_tools(tools)
        if self.limit < 1:
            raise ConfigError(f"sampling.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {context} positions ({context_key} in its config.json); lower "
                              "sampling.max_new_tokens")

    def use_tools(self, tools: Sequence[Any]) -> None:
        """The tools the rollout offers every prompt (they are rendered into it)."""
        self.schemas = [t.schema() for t in tools] or None
        self._overheads.clear()

    def _render(self, prompt: Prompt) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(prompt.messages, tools=self.schemas or prompt.tools or None,
                                           add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok("\n".join(str(m.get("content", "")) for m in prompt.messages))["input_ids"]

    def length(self, prompt: Prompt) -> int:
        """The prompt's tokens as the rollout renders it (images not counted)."""
        return len(self._render(prompt))

    def _overhead(self, prompt: Prompt) -> int:
        """Tokens of the template around messages with these roles (computed once per role sequence)."""
        roles = tuple(str(m.get("role", "")) for m in prompt.messages)
        if roles not in self._overheads:
            empty = Prompt(messages=[{"role": r, "content": ""} for r in roles], tools=prompt.tools)
            self._overheads[roles] = self.length(empty) + SLACK_PER_MESSAGE * len(roles)
        return self._overheads[roles]

    def fits(self, prompt: Prompt) -> tuple[bool, int | None]:
        """(fits, its length when it had to be counted)."""
        text_bytes = sum(len(str(m.get("content", "")).encode()) for m in prompt.messages)
        if prompt.tools is None and text_bytes + self._overhead(prompt) <= self.limit:
            return True, None
        n = self.length(prompt)
        return n <= self.limit, n

    def error(self, prompt: Prompt, length: int, where: str) -> DataError:
        return DataError(
            f"{where}: prompt {prompt.id!r} has {length} tokens, and with sampling.max_new_tokens="
            f"{self.max_new_tokens} it exceeds the model's context of {self.context} positions ({self.context_key}); "
            f"lower sampling.max_new_tokens, use shorter prompts, or --set trainer.filter_overlong_prompts=true "
            "to leave such prompts out")

    def check(self, prompts: Sequence[Prompt], where: str, drop: bool) -> Sequence[Prompt]:
        """`prompts` if all fit; else an error naming the first that does not, or (`drop`) those that fit."""
        kept: list[Prompt] = []
        dropped = 0
        for i in range(len(prompts)):
            prompt = prompts[i]
            ok, n = self.fits(prompt)
            if ok:
                kept.append(prompt)
                continue
            if not drop:
                raise self.error(prompt, n or 0, where)
            dropped += 1
        if not dropped:
            return prompts
        if not kept:
            raise DataError(f"{where}: none of the {dropped} prompts fits the model's context of {self.context} "
                            f"positions with sampling.max_new_tokens={self.max_new_tokens}; lower it")
        log.warning("%s: left out %d of %d prompts longer than %d tokens (trainer.filter_overlong_prompts)",
                    where, dropped, len(prompts), self.limit)
        return kept


def prompt_fit(ctx: Any, max_new_tokens: int) -> PromptFit | None:
    """The context-length check for the run's model (a RunContext), or None when its config names no context
    length; a ConfigError at once when `max_new_tokens` alone leaves no room."""
    found = model_context(ctx.model.path)
    if found is None:
        return None
    return PromptFit(ctx.model.tokenizer, found[0], found[1], max_new_tokens)
