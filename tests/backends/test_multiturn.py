"""The multi-turn tool loop with the real Qwen3 tokenizer and chat template and a scripted engine.

The scripted engine answers each sample's turn with the token encoding of a canned assistant message,
so parsing, rendering by the chat template, loss masking, limits and every error path run for real
without a model.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from rlcore import Prompt, SamplingParams, Tool, ToolResult
from rlcore.errors import RLCoreError
from rlcore_backends.rollout.engine import TurnOptions, run_turns
from rlcore_backends.rollout.multiturn import argument_errors, truncate_text, turn_ids
from rlcore_backends.rollout.toolformats.hermes import Hermes
from scripted import LOGPROB, ScriptedEngine

QWEN3 = Path(__file__).resolve().parents[1] / "data" / "qwen3-tokenizer"


@pytest.fixture(scope="module")
def tok() -> Any:
    return AutoTokenizer.from_pretrained(QWEN3)


def call(name: str, arguments: Any) -> str:
    import json
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


class Adder(Tool):
    """Adds two integers; counts its instances' lifecycle so tests can check create/release."""

    name = "add"
    description = "Add two integers."
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"], "additionalProperties": False}

    def __init__(self) -> None:
        self.created: list[dict[str, int]] = []
        self.released: list[dict[str, int]] = []

    def create(self, prompt: Prompt) -> dict[str, int]:
        state = {"calls": 0}
        self.created.append(state)
        return state

    def execute(self, instance: dict[str, int], arguments: dict[str, Any]) -> ToolResult:
        instance["calls"] += 1
        return ToolResult(str(arguments["a"] + arguments["b"]), reward=0.5)

    def release(self, instance: dict[str, int]) -> None:
        self.released.append(instance)


class Broken(Tool):
    name = "broken"
    parameters = {"type": "object", "properties": {}}

    def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
        raise ValueError("disk on fire")


class Sleepy(Tool):
    name = "sleep"
    parameters = {"type": "object", "properties": {"seconds": {"type": "number"}}}

    def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
        time.sleep(arguments["seconds"])
        return ToolResult("awake")


class Echo(Tool):
    name = "echo"
    parameters = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}

    def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
        return ToolResult(arguments["text"])


def ask(*questions: str) -> list[Prompt]:
    return [Prompt(messages=[{"role": "user", "content": q}], id=q) for q in questions]


def response(batch: Any, i: int) -> tuple[list[int], list[float], list[float]]:
    n = int(batch.attention_mask[i].sum())
    return (batch.response_ids[i, :n].tolist(), batch.response_mask[i, :n].tolist(),
            batch.rollout_logprobs[i, :n].tolist())


# ---- parsing, validation, rendering ---------------------------------------------------------------

def test_hermes_parse() -> None:
    text = ('I will add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>{"name": "echo", "arguments": "{\\"text\\": \\"hi\\"}"}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>'
            '<tool_call>["add"]</tool_call><tool_call>{"arguments": {}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 5, "b": 6}}')
    calls = Hermes().parse(text, [])
    assert [(c.name, c.arguments) for c in calls[:2]] == [("add", {"a": 1, "b": 2}), ("echo", {"text": "hi"})]
    assert "not valid JSON" in calls[2].error
    assert "must be a JSON object" in calls[3].error and "must be a JSON object" in calls[4].error
    assert (calls[5].name, calls[5].arguments, calls[5].error) == ("add", {"a": 5, "b": 6}, ""), "unclosed last block"
    assert Hermes().parse("no calls here </tool_call>", []) == []


def test_argument_errors() -> None:
    params = Adder.parameters
    assert argument_errors(params, {"a": 1, "b": 2}) == []
    assert argument_errors(params, {"a": 1}) == ["missing required argument 'b'"]
    assert argument_errors(params, {"a": 1, "b": "2"}) == ["argument 'b' must be integer, got str"]
    assert argument_errors(params, {"a": True, "b": 2}) == ["argument 'a' must be integer, got bool"]
    assert argument_errors(params, {"a": 1, "b": 2, "c": 3}) == ["unknown argument 'c' (expected: a, b)"]
    loose = {"type": "object", "properties": {"x": {"type": ["number", "null"], "enum": [1, 2.5, None]}}}
    assert argument_errors(loose, {"x": 2.5, "extra": 1}) == []
    assert argument_errors(loose, {"x": 3}) == ["argument 'x' must be one of [1, 2.5, None], got 3"]


def test_truncate_text(tok: Any) -> None:
    text = " ".join(f"word{i}" for i in range(50))
    assert truncate_text(tok, text, 1000) == text
    cut = truncate_text(tok, text, 5)
    assert cut.endswith("...(truncated)") and text.startswith(cut.removesuffix("...(truncated)"))
    assert len(tok(cut.removesuffix("...(truncated)"), add_special_tokens=False)["input_ids"]) == 5


def test_turn_ids_follow_the_qwen3_template(tok: Any) -> None:
    """Consecutive tool answers share one user turn of <tool_response> blocks, then the generation prompt."""
    ids = turn_ids(tok, [{"role": "tool", "content": "3"}, {"role": "tool", "content": "hello"}], end_of_turn=tok.convert_tokens_to_ids("<|im_end|>"))
    assert tok.decode(ids) == ("\n<|im_start|>user\n<tool_response>\n3\n</tool_response>\n<tool_response>\nhello"
                               "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(RLCoreError, match="does not end an assistant turn with '<\\|endoftext\\|>'"):
        turn_ids(tok, [{"role": "tool", "content": "3"}], end_of_turn=tok.pad_token_id)


# ---- the loop -------------------------------------------------------------------------------------

def test_two_tool_turns_render_mask_and_count(tok: Any) -> None:
    """The context of each turn is exactly the chat template's rendering of the conversation so far, tool
    tokens are out of the loss with logprob 0, and info counts turns, calls and step rewards."""
    adder = Adder()
    script = {"1+2+3?": [call("add", {"a": 1, "b": 2}), call("add", {"a": 3, "b": 3}), "It is 6."],
              "hi": ["Hello!"]}
    engine = ScriptedEngine(tok, script)
    prompts = ask("1+2+3?", "hi")
    batch = run_turns(engine, tok, prompts, SamplingParams(n=2, max_new_tokens=200), [adder],
                      TurnOptions(max_turns=4))
    batch.validate()
    assert batch.group_ids.tolist() == [0, 0, 1, 1] and [p.id for p in batch.prompts] == ["1+2+3?"] * 2 + ["hi"] * 2
    assert [c.n for c in engine.calls] == [1, 1, 1], "three engine calls, one completion per row"
    assert [c.seed for c in engine.calls] == [None] * 3

    tools = [adder.schema()]
    conversation = [{"role": "user", "content": "1+2+3?"}]
    for turn, (reply, answer) in enumerate([(script["1+2+3?"][0], "3"), (script["1+2+3?"][1], "6")]):
        conversation += [{"role": "assistant", "content": reply}, {"role": "tool", "content": answer}]
        expected = tok.apply_chat_template(conversation, tools=tools, add_generation_prompt=True, tokenize=False)
        seen = [c for c in engine.contexts if "1+2+3?" in tok.decode(c)][2 * (turn + 1)]
        assert tok.decode(seen) == expected, f"turn {turn + 2} context differs from the template rendering"
    prompt_text = tok.apply_chat_template(ask("1+2+3?")[0].messages, tools=tools, add_generation_prompt=True,
                                          tokenize=False)
    plen = int(batch.prompt_mask[0].sum())
    assert tok.decode(batch.prompt_ids[0, -plen:]) == prompt_text

    ids, mask, logprobs = response(batch, 0)
    assert tok.decode(ids) == tok.decode(engine.contexts[-2])[len(prompt_text):] + "It is 6.<|im_end|>"
    policy = [tok.decode([t]) for t, m in zip(ids, mask) if m == 1]
    tool_out = tok.decode([t for t, m in zip(ids, mask) if m == 0])
    assert "".join(policy) == script["1+2+3?"][0] + "<|im_end|>" + script["1+2+3?"][1] + "<|im_end|>It is 6.<|im_end|>"
    assert tool_out == ("\n<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
                        "\n<|im_start|>user\n<tool_response>\n6\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert all(lp == (LOGPROB if m else 0.0) for lp, m in zip(logprobs, mask))
    assert batch.attention_mask[0, :len(ids)].all()

    counts = [{k: v for k, v in info.items() if k != "messages"} for info in batch.info]
    assert counts[0] == {"finish_reason": "eos", "turns": 3, "tool_calls": 2, "tool_errors": 0, "tool_reward": 1.0}
    assert counts[2] == {"finish_reason": "eos", "turns": 1, "tool_calls": 0, "tool_errors": 0, "tool_reward": 0.0}
    assert batch.info[0]["messages"] == [
        {"role": "assistant", "content": script["1+2+3?"][0]}, {"role": "tool", "content": "3"},
        {"role": "assistant", "content": script["1+2+3?"][1]}, {"role": "tool", "content": "6"},
        {"role": "assistant", "content": "It is 6."}]
    assert tok.decode(response(batch, 2)[0]) == "Hello!<|im_end|>" and response(batch, 2)[1] == [1.0] * 3
    assert batch.texts[0].endswith("It is 6.") and "<tool_response>" in batch.texts[0]
    assert not batch.truncated.any()
    assert len(adder.created) == 2 and all(s["calls"] == 2 for s in adder.created), "one instance per sample"
    assert sorted(map(id, adder.released)) == sorted(map(id, adder.created)), "every instance released"


@pytest.mark.parametrize(("reply", "error"), [
    ('<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>', "Error: the tool call is not valid JSON"),
    (call("multiply", {"a": 1}), "Error: unknown tool 'multiply'; available tools: add, broken, sleep"),
    (call("add", {"a": 1, "b": "x"}), "Error: wrong arguments for 'add': argument 'b' must be integer"),
    (call("add", {"a": 1}), "Error: wrong arguments for 'add': missing required argument 'b'"),
    (call("broken", {}), "Error: tool 'broken' failed: ValueError: disk on fire"),
    (call("sleep", {"seconds": 5}), "Error: tool 'sleep' timed out after 0.3 s"),
])
def test_errors_become_text_and_counts(tok: Any, reply: str, error: str) -> None:
    engine = ScriptedEngine(tok, {"q": [reply, "Sorry."]})
    start = time.perf_counter()
    batch = run_turns(engine, tok, ask("q"), SamplingParams(n=1, max_new_tokens=300), [Adder(), Broken(), Sleepy()],
                      TurnOptions(max_turns=3, tool_timeout=0.3))
    assert time.perf_counter() - start < 3, "a stuck tool does not stall the rollout"
    second = tok.decode(engine.contexts[1])
    answer = second.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>")[0]
    assert answer.startswith(error)
    assert batch.info[0]["tool_calls"] == 1 and batch.info[0]["tool_errors"] == 1 and batch.info[0]["turns"] == 2
    assert batch.texts[0].endswith("Sorry.")


def test_tool_result_error_flag_is_counted(tok: Any) -> None:
    class Refuses(Tool):
        name = "refuse"

        def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
            return ToolResult("not allowed", error=True)

    engine = ScriptedEngine(tok, {"q": [call("refuse", {}) + call("refuse", {}), "ok"]})
    batch = run_turns(engine, tok, ask("q"), SamplingParams(n=1, max_new_tokens=300), [Refuses()],
                      TurnOptions(max_turns=2))
    assert tok.decode(engine.contexts[1]).count("<tool_response>\nnot allowed\n</tool_response>") == 2
    assert (batch.info[0]["tool_calls"], batch.info[0]["tool_errors"]) == (2, 2)


def test_tool_calls_of_a_batch_run_concurrently(tok: Any) -> None:
    """Every sample's call waits on one barrier: it only passes if all calls run at the same time."""
    barrier = threading.Barrier(6, timeout=5)

    class Meet(Tool):
        name = "meet"

        def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
            barrier.wait()
            return ToolResult("met")

    engine = ScriptedEngine(tok, {"a": [call("meet", {}), "done"], "b": [call("meet", {}), "done"]})
    batch = run_turns(engine, tok, ask("a", "b"), SamplingParams(n=3, max_new_tokens=100), [Meet()],
                      TurnOptions(max_turns=2, tool_timeout=10))
    assert [i["tool_errors"] for i in batch.info] == [0] * 6
    assert all("<tool_response>\nmet\n</tool_response>" in tok.decode(c) for c in engine.contexts[6:])


def test_each_turn_gets_fresh_seeds(tok: Any) -> None:
    """With params.seed, turn t samples with seed + t * B, so no row reuses another turn's row seeds."""
    engine = ScriptedEngine(tok, {"q": [call("echo", {"text": "a"}), call("echo", {"text": "b"}), "done"]})
    run_turns(engine, tok, ask("q"), SamplingParams(n=2, max_new_tokens=200, seed=10), [Echo()],
              TurnOptions(max_turns=3))
    assert [c.seed for c in engine.calls] == [10, 12, 14]


def test_max_turns_stops_the_loop(tok: Any) -> None:
    adder = Adder()
    engine = ScriptedEngine(tok, {"q": [call("add", {"a": i, "b": 1}) for i in range(5)]})
    batch = run_turns(engine, tok, ask("q"), SamplingParams(n=1, max_new_tokens=500), [adder],
                      TurnOptions(max_turns=2))
    assert batch.info[0]["turns"] == 2 and batch.info[0]["tool_calls"] == 1, "the last turn's call is not executed"
    assert batch.info[0]["finish_reason"] == "eos" and not batch.truncated[0]
    assert tok.decode(response(batch, 0)[0]).endswith(call("add", {"a": 1, "b": 1}) + "<|im_end|>")
    single = run_turns(engine, tok, ask("q"), SamplingParams(n=1, max_new_tokens=500), [adder],
                       TurnOptions(max_turns=1))
    assert single.info[0]["turns"] == 1 and single.info[0]["tool_calls"] == 0


def test_max_new_tokens_bounds_the_whole_response(tok: Any) -> None:
    """The budget covers every turn and the tool output; running out anywhere truncates the sample."""
    text = "x " * 40
    engine = ScriptedEngine(tok, {"q": [call("echo", {"text": text}), "The end."]})
    first = len(tok(call("echo", {"text": text}) + "<|im_end|>", add_special_tokens=False)["input_ids"])
    tool = len(turn_ids(tok, [{"role": "tool", "content": text}], end_of_turn=tok.convert_tokens_to_ids("<|im_end|>")))
    last = len(tok("The end.<|im_end|>", add_special_tokens=False)["input_ids"])
    cases = {  # budget: (loss mask, tool calls, finish reason)
        first - 3: ([1] * (first - 3), 0, "length"),
        first + 10: ([1] * first + [0] * 10, 1, "length"),
        first + tool + 2: ([1] * first + [0] * tool + [1] * 2, 1, "length"),
        first + tool + last: ([1] * first + [0] * tool + [1] * last, 1, "eos"),
    }
    for budget, (mask, calls, finish) in cases.items():
        batch = run_turns(engine, tok, ask("q"), SamplingParams(n=1, max_new_tokens=budget), [Echo()],
                          TurnOptions(max_turns=3))
        batch.validate()
        assert response(batch, 0)[1] == mask, f"budget {budget}"
        assert (batch.info[0]["tool_calls"], batch.info[0]["finish_reason"]) == (calls, finish)
        assert bool(batch.truncated[0]) == (finish == "length")
    assert engine.calls[-1].max_new_tokens == last, "the second turn gets what is left of the budget"


def test_long_tool_answers_are_cut(tok: Any) -> None:
    long = " ".join(f"w{i}" for i in range(100))
    engine = ScriptedEngine(tok, {"q": [call("echo", {"text": long}), "ok"]})
    run_turns(engine, tok, ask("q"), SamplingParams(n=1, max_new_tokens=400), [Echo()],
              TurnOptions(max_turns=2, max_tool_response_tokens=7))
    answer = tok.decode(engine.contexts[1]).rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>")[0]
    assert answer == truncate_text(tok, long, 7) and answer.endswith("...(truncated)")


def test_prompt_tools_override_the_offered_schemas(tok: Any) -> None:
    only_add = [Adder().schema()]
    engine = ScriptedEngine(tok, {"q": ["ok"]})
    prompt = Prompt(messages=[{"role": "user", "content": "q"}], tools=only_add)
    run_turns(engine, tok, [prompt], SamplingParams(n=1), [Adder(), Echo()], TurnOptions(max_turns=2))
    text = tok.decode(engine.contexts[0])
    assert '"name": "add"' in text and '"name": "echo"' not in text


def test_without_tools_one_engine_call(tok: Any) -> None:
    engine = ScriptedEngine(tok, {"q": [call("add", {"a": 1, "b": 2})]})
    batch = run_turns(engine, tok, ask("q"), SamplingParams(n=3, max_new_tokens=50), [], TurnOptions(max_turns=4))
    assert len(engine.calls) == 1 and engine.calls[0].n == 3 and len(engine.contexts) == 3
    assert batch.info == [{"finish_reason": "eos"}] * 3, "no tool loop, no tool counts"
    assert "# Tools" not in tok.decode(engine.contexts[0])
    assert torch.equal(batch.response_mask, batch.attention_mask.float())


def test_tools_need_a_chat_template(tok: Any) -> None:
    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(RLCoreError, match="need a tokenizer with a chat template"):
            run_turns(ScriptedEngine(tok, {}), tok, ask("q"), SamplingParams(n=1), [Adder()],
                      TurnOptions(max_turns=2))
    finally:
        tok.chat_template = template
