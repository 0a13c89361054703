"""Interactions in the engine-agnostic multi-turn driver: a simulated user answers assistant turns that call no
tool (verl's Interaction), its turns rendered by the chat template, masked out of the loss and rewarded per
turn. Scripted engine and the embedded tool model's tokenizer (Qwen's chat layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rlcore import Interaction, InteractionTurn, Prompt, SamplingParams, Tool, ToolResult
from rlcore.errors import ConfigError
from rlcore.evaluate import turn_inputs
from rlcore.models import build_tiny_tool_tokenizer, load_tokenizer
from rlcore.plugins import Registry
from rlcore_backends.rollout.engine import TurnOptions, run_turns
from rlcore_tasks.interactions import CORRECT, TRY_AGAIN, GSM8KInteraction
from scripted import LOGPROB, ScriptedEngine


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tool_tokenizer(directory)
    return load_tokenizer(str(directory))


class Teacher(Interaction):
    """Expects the answer `prompt.answer`; counts its lifecycle."""

    name = "teacher"

    def __init__(self) -> None:
        self.started: list[dict[str, Any]] = []
        self.released: list[dict[str, Any]] = []
        self.seen: list[list[dict[str, Any]]] = []

    def start(self, prompt: Prompt) -> dict[str, Any]:
        state = {"answer": prompt.answer, "reward": 0.0}
        self.started.append(state)
        return state

    def respond(self, instance: dict[str, Any], messages: list[dict[str, Any]]) -> InteractionTurn:
        self.seen.append(list(messages))
        right = messages[-1]["content"].strip() == instance["answer"]
        instance["reward"] = float(right)
        return InteractionTurn(done=right, text="Right." if right else "Wrong, try again.", reward=float(right))

    def score(self, instance: dict[str, Any]) -> float:
        return instance["reward"] * 10

    def release(self, instance: dict[str, Any]) -> None:
        self.released.append(instance)


class Adder(Tool):
    name = "add"
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}

    def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
        return ToolResult(str(arguments["a"] + arguments["b"]))


def ask(question: str, answer: str) -> list[Prompt]:
    return [Prompt(messages=[{"role": "user", "content": question}], answer=answer, id=question)]


def response(batch: Any, i: int) -> tuple[list[int], list[float]]:
    n = int(batch.attention_mask[i].sum())
    return batch.response_ids[i, :n].tolist(), batch.response_mask[i, :n].tolist()


def test_interaction_turns_are_rendered_masked_and_rewarded(tok: Any) -> None:
    teacher = Teacher()
    engine = ScriptedEngine(tok, {"2+5?": ["6", "8", "7", "never"]})
    batch = run_turns(engine, tok, ask("2+5?", "7"), SamplingParams(n=2, max_new_tokens=200), (),
                      TurnOptions(max_turns=4), interaction=teacher)
    batch.validate()
    conversation = [{"role": "user", "content": "2+5?"}]
    for turn, answer in enumerate(["6", "8"]):
        conversation += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Wrong, try again."}]
        expected = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert tok.decode(engine.contexts[2 * (turn + 1)]) == expected, f"turn {turn + 2} context"
    assert teacher.seen[0] == [{"role": "user", "content": "2+5?"}, {"role": "assistant", "content": "6"}]
    info = batch.info[0]
    assert (info["turns"], info["user_turns"], info["turn_rewards"]) == (3, 3, [0.0, 0.0, 1.0])
    assert (info["interaction_reward"], info["interaction_score"], info["interaction_errors"]) == (1.0, 10.0, 0)
    assert info["finish_reason"] == "eos" and info["tool_calls"] == 0
    assert [m["role"] for m in info["messages"]] == ["assistant", "user"] * 2 + ["assistant"]
    ids, mask = response(batch, 0)
    assert tok.decode([t for t, m in zip(ids, mask) if m == 1]) == "6<|im_end|>8<|im_end|>7<|im_end|>"
    assert tok.decode([t for t, m in zip(ids, mask) if m == 0]) == (
        "\n<|im_start|>user\nWrong, try again.<|im_end|>\n<|im_start|>assistant\n" * 2)
    assert batch.rollout_logprobs[0, :len(ids)].tolist() == [LOGPROB if m else 0.0 for m in mask]
    assert "Right." not in tok.decode(ids), "the reply that ends the conversation is not appended"
    assert len(teacher.started) == 2 and sorted(map(id, teacher.released)) == sorted(map(id, teacher.started))


def test_turn_limits_end_the_conversation(tok: Any) -> None:
    script = {"q": ["1", "2", "3", "4", "5"]}
    capped = run_turns(ScriptedEngine(tok, script), tok, ask("q", "9"), SamplingParams(n=1, max_new_tokens=200), (),
                       TurnOptions(max_turns=5, max_user_turns=2), interaction=Teacher())
    assert (capped.info[0]["turns"], capped.info[0]["user_turns"]) == (3, 2)
    short = run_turns(ScriptedEngine(tok, script), tok, ask("q", "9"), SamplingParams(n=1, max_new_tokens=200), (),
                      TurnOptions(max_turns=2), interaction=Teacher())
    assert (short.info[0]["turns"], short.info[0]["user_turns"]) == (2, 1), "the last turn gets no reply"
    budget = len(tok("1<|im_end|>", add_special_tokens=False)["input_ids"]) + 5
    cut = run_turns(ScriptedEngine(tok, script), tok, ask("q", "9"), SamplingParams(n=1, max_new_tokens=budget), (),
                    TurnOptions(max_turns=5), interaction=Teacher())
    assert cut.info[0]["finish_reason"] == "length" and bool(cut.truncated[0])
    assert response(cut, 0)[1] == [1.0, 1.0] + [0.0] * 5, "the reply is cut at the response budget"


def test_tool_calls_go_to_tools_and_answers_to_the_interaction(tok: Any) -> None:
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 5}}\n</tool_call>'
    engine = ScriptedEngine(tok, {"2+5?": [call, "6", call, "7"]})
    batch = run_turns(engine, tok, ask("2+5?", "7"), SamplingParams(n=1, max_new_tokens=300), [Adder()],
                      TurnOptions(max_turns=6), interaction=Teacher())
    info = batch.info[0]
    assert [m["role"] for m in info["messages"]] == ["assistant", "tool", "assistant", "user", "assistant", "tool",
                                                     "assistant"]
    assert (info["tool_calls"], info["user_turns"], info["turn_rewards"]) == (2, 2, [0.0, 1.0])


def test_a_failing_interaction_ends_its_sample_and_is_counted(tok: Any) -> None:
    class Broken(Teacher):
        def respond(self, instance: dict[str, Any], messages: list[dict[str, Any]]) -> InteractionTurn:
            raise KeyError("oops")

    engine = ScriptedEngine(tok, {"q": ["1", "2"]})
    with pytest.warns(UserWarning, match="interaction 'teacher' failed in respond: KeyError"):
        batch = run_turns(engine, tok, ask("q", "2"), SamplingParams(n=2, max_new_tokens=100), (),
                          TurnOptions(max_turns=3), interaction=Broken())
    assert [i["interaction_errors"] for i in batch.info] == [1, 1]
    assert [i["turns"] for i in batch.info] == [1, 1] and len(engine.calls) == 1


def test_gsm8k_interaction_in_the_loop(tok: Any) -> None:
    """verl's GSM8K interaction: a wrong final number gets its "try again", the right one ends the sample."""
    engine = ScriptedEngine(tok, {"How many?": ["I think 12.\n#### 12", "Sorry: 3 + 4 = 7.\n#### 7"]})
    batch = run_turns(engine, tok, ask("How many?", "7"), SamplingParams(n=1, max_new_tokens=300), (),
                      TurnOptions(max_turns=5), interaction=GSM8KInteraction())
    info = batch.info[0]
    assert info["messages"][1] == {"role": "user", "content": TRY_AGAIN}
    assert (info["turn_rewards"], info["interaction_score"], info["turns"]) == ([0.0, 1.0], 1.0, 2)
    assert CORRECT not in batch.texts[0]


def test_the_core_refuses_an_interaction_the_rollout_cannot_run() -> None:
    """A rollout whose sample hook takes no `interaction` would silently drop it: the run stops instead."""
    from rlcore import hookimpl

    class OldRollout:
        @hookimpl
        def sample(self, prompts: Any, params: Any, tools: Any) -> Any:
            return None

    class Task:
        @hookimpl
        def interaction(self) -> Interaction:
            return Teacher()

    registry = Registry()
    registry.register("rollout", "old", OldRollout())
    assert turn_inputs(registry) == {"tools": [], "interaction": None}
    registry.register("task", "talks", Task())
    with pytest.raises(ConfigError, match="rollout 'old' cannot run"):
        turn_inputs(registry)


def test_the_sglang_rollout_runs_interactions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same driver behind the sglang rollout (SGLang's Engine double over the random embedded tool model):
    answers that end get the interaction's reply, masked out of the loss."""
    import types

    from sglang_fake import FakeEngine

    from rlcore.models import build_tiny_tool_model
    from rlcore.testing import make_context
    from rlcore_backends.rollout.sglang import engines as sglang_engine
    from rlcore_backends.rollout.sglang.rollout import SGLangRollout

    class No(Teacher):
        def respond(self, instance: dict[str, Any], messages: list[dict[str, Any]]) -> InteractionTurn:
            return InteractionTurn(done=False, text="No.", reward=-1.0)

    monkeypatch.setattr(sglang_engine, "import_sglang", lambda: types.SimpleNamespace(Engine=FakeEngine))
    ctx = make_context(tmp_path / "run", build_tiny_tool_model(tmp_path / "model"))
    rollout = SGLangRollout(SGLangRollout.Options(max_turns=2))
    rollout.setup(ctx=ctx)
    batch = rollout.sample(ask("2+5?", "7") + ask("1+1?", "2"), SamplingParams(n=8, max_new_tokens=48, seed=1), (),
                           No())
    rollout.teardown()
    batch.validate()
    replied = [i for i, info in enumerate(batch.info) if info["user_turns"]]
    assert replied and all(batch.info[i]["turn_rewards"] == [-1.0] for i in replied)
    reply = "\n<|im_start|>user\nNo.<|im_end|>\n<|im_start|>assistant\n"
    for i in replied:
        ids, mask = response(batch, i)
        masked = ctx.model.tokenizer.decode([t for t, m in zip(ids, mask) if m == 0])
        assert masked and reply.startswith(masked), "the reply (cut at the token budget) is out of the loss"
        assert batch.rollout_logprobs[i, :len(ids)][torch.tensor(mask) == 0].abs().sum() == 0


def test_a_ray_placed_rollout_without_interactions_refuses_one() -> None:
    """The Ray proxy takes `interaction` for every rollout; it refuses one the plugin's sample cannot take."""
    from rlcore import hookimpl
    from rlcore.errors import PluginError
    from rlcore_backends.placement.ray.proxy import proxy_class
    from rlcore_backends.placement.ray.workers import Workers

    class OldRollout:
        @hookimpl
        def sample(self, prompts: Any, params: Any, tools: Any) -> Any:
            return None

    proxy = proxy_class(OldRollout)(Workers(1.0, ""), lambda kind: [], "rollout", "old", OldRollout, None)
    with pytest.raises(PluginError, match="rollout plugin 'old' does not run interactions"):
        proxy.sample([], SamplingParams(), [], Teacher())
