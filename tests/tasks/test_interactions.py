"""verl's GSM8K interaction (the simulated user of the `_w_interaction` recipe) and the gsm8k task's
interaction mode, on the GSM8K problems shipped in examples/data."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlcore import InteractionTurn, Prompt
from rlcore.config import build_options
from rlcore_tasks.gsm8k import GSM8K, INTERACTION_SYSTEM_PROMPT, TOOL_SYSTEM_PROMPT
from rlcore_tasks.interactions import CORRECT, TRY_AGAIN, GSM8KInteraction, last_assistant_turn

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm8k"


def task(**options: object) -> GSM8K:
    return GSM8K(build_options(GSM8K.Options, {"path": str(DATA), **options}, "task"))


def chat(*turns: str) -> list[dict[str, str]]:
    """A conversation: the question, then alternating assistant and user turns."""
    roles = ["assistant", "user"]
    return [{"role": "user", "content": "q"}] + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


@pytest.mark.parametrize(("answer", "turns", "reward"), [
    ("72", ["Natalia sold 48 + 24 = 72 clips.\n#### 72"], 1.0),
    ("72", ["#### 72"], 1.0),
    ("72", ["72"], 1.0),
    ("1000", ["It costs $1,000."], 1.0),
    ("72", ["#### 72 clips, or 73?"], 0.0),  # the last number counts, as in verl's flexible extraction
    ("72", ["#### 71", TRY_AGAIN, "Let me fix it: 72"], 1.0),
    ("72", ["#### 72", TRY_AGAIN, "no idea"], 0.0),
    ("-3", ["it is -3"], 1.0),
    ("5", ["9" * 5000 + " or 5"], 1.0),
    ("5", [""], 0.0),
])
def test_the_last_assistant_turn_is_graded(answer: str, turns: list[str], reward: float) -> None:
    interaction = GSM8KInteraction()
    state = interaction.start(Prompt(messages=[], answer=answer))
    reply = interaction.respond(state, chat(*turns))
    assert reply == InteractionTurn(done=reward == 1.0, text=CORRECT if reward else TRY_AGAIN, reward=reward)
    assert interaction.score(state) == reward


def test_verls_texts_and_the_final_score_follow_the_last_reply() -> None:
    assert TRY_AGAIN == "Your response is incorrect! You need to reflect on your answer and try again."
    assert CORRECT == "Your response is correct!"
    interaction = GSM8KInteraction()
    state = interaction.start(Prompt(messages=[], answer="7"))
    assert interaction.score(state) == 0.0, "no answer seen yet"
    interaction.respond(state, chat("7"))
    interaction.respond(state, chat("7", TRY_AGAIN, "8"))
    assert interaction.score(state) == 0.0
    assert last_assistant_turn([{"role": "user", "content": "5"}]) == ""


def test_interaction_mode_of_the_gsm8k_task() -> None:
    plain, talking, both = task(), task(interaction=True), task(interaction=True, multi_turn=True)
    assert plain.interaction() is None and isinstance(talking.interaction(), GSM8KInteraction)
    first = talking.dataset("train")[0]
    assert first.messages[0] == {"role": "system", "content": INTERACTION_SYSTEM_PROMPT}
    assert first.messages[1] == plain.dataset("train")[0].messages[0]
    assert talking.tools() == [] and [t.name for t in both.tools()] == ["calculator", "calc_gsm8k_reward"]
    assert both.dataset("train")[0].messages[0]["content"] == TOOL_SYSTEM_PROMPT
