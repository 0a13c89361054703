"""Simulated users for multi-turn rollouts (`rlcore.Interaction`): verl's GSM8K interaction, which tells the
model whether its answer is right and asks it to try again when it is not (the `_w_interaction` recipes)."""

from __future__ import annotations

from typing import Any

import attrs

from rlcore import Interaction, InteractionTurn, Prompt
from rlcore_tasks.answers import gsm8k_answer, parse_number

CORRECT = "Your response is correct!"
TRY_AGAIN = "Your response is incorrect! You need to reflect on your answer and try again."


@attrs.define
class Attempt:
    """One sample's conversation with the interaction: its prompt and the grade of its latest answer."""

    prompt: Prompt
    reward: float = 0.0


def last_assistant_turn(messages: list[dict[str, Any]]) -> str:
    """The content of the last assistant message ("" when there is none)."""
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "assistant"), "")


class GSM8KInteraction(Interaction):
    """Grades the last assistant turn by its last number (verl grades it with the flexible GSM8K extraction):
    right ends the conversation ("Your response is correct!"), wrong asks to try again. Each reply's reward
    is the grade (1.0 or 0.0); the final score is the grade of the last answer."""

    name = "gsm8k"

    def start(self, prompt: Prompt) -> Attempt:
        """A fresh attempt for one sample."""
        return Attempt(prompt=prompt)

    def respond(self, instance: Attempt, messages: list[dict[str, Any]]) -> InteractionTurn:
        """The verdict on the latest answer."""
        value = gsm8k_answer(last_assistant_turn(messages), "flexible")
        instance.reward = float(value is not None and value == parse_number(str(instance.prompt.answer)))
        return InteractionTurn(done=instance.reward == 1.0, text=CORRECT if instance.reward == 1.0 else TRY_AGAIN,
                               reward=instance.reward)

    def score(self, instance: Attempt) -> float:
        """The grade of the last answer the interaction saw."""
        return instance.reward
