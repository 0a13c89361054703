"""Tool-call formats as plugins: found through entry points, selected by `rollout.tool_format`, and the
Qwen3-Coder XML format parsed and rendered with Qwen3-Coder's real chat template (tests/data/chat_templates).

The tokenizer is the embedded tool model's (characters plus Qwen's chat and tool tokens), which encodes any
ASCII text a Qwen chat template renders; the template text is Qwen3-Coder's own.
"""

from __future__ import annotations

from typing import Any

import pytest

from rlcore import Prompt, SamplingParams, Tool, ToolFormat, ToolResult
from rlcore.config import build_options
from rlcore.errors import ConfigError, PluginError
from rlcore.models import build_tiny_tool_tokenizer, load_tokenizer
from rlcore_backends.rollout.engine import TurnOptions, run_turns
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.rollout.toolformats import available, tool_format
from rlcore_backends.rollout.toolformats.qwen3_coder import Qwen3Coder
from scripted import CHAT_TEMPLATES, LOGPROB, ScriptedEngine


class Adder(Tool):
    name = "add"
    description = "Add two integers."
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"], "additionalProperties": False}

    def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
        return ToolResult(str(arguments["a"] + arguments["b"]))


class Everything(Tool):
    """A tool with one parameter of each JSON-schema type, to check how values are typed."""

    name = "everything"
    description = "Takes every type."
    parameters = {"type": "object", "properties": {
        "text": {"type": "string"}, "count": {"type": "integer"}, "ratio": {"type": "number"},
        "flag": {"type": "boolean"}, "options": {"type": "object"}, "items": {"type": "array"},
        "maybe": {"type": ["integer", "null"]}, "loose": {}}}

    def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
        return ToolResult("ok")


@pytest.fixture(scope="module")
def coder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The embedded tool tokenizer with Qwen3-Coder's chat template."""
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tool_tokenizer(directory)
    tok = load_tokenizer(str(directory))
    tok.chat_template = (CHAT_TEMPLATES / "qwen3_coder.jinja").read_text()
    return tok


def xml_call(name: str, **arguments: str) -> str:
    """A call as Qwen3-Coder writes it (values as text on lines of their own)."""
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


# ---- the registry ---------------------------------------------------------------------------------

def test_formats_are_entry_point_plugins() -> None:
    assert {"hermes", "qwen3_coder"} <= set(available())
    assert isinstance(tool_format("qwen3_coder"), Qwen3Coder) and isinstance(tool_format("hermes"), ToolFormat)
    with pytest.raises(PluginError, match=r"unknown tool_format plugin 'harmony'.*--set rollout.tool_format=NAME"):
        tool_format("harmony")


def test_the_option_accepts_installed_formats_only() -> None:
    assert build_options(HFRollout.Options, {"tool_format": "qwen3_coder"}, "rollout").tool_format == "qwen3_coder"
    with pytest.raises(ConfigError, match="rollout: tool_format='harmony' is not installed; installed formats: "):
        build_options(HFRollout.Options, {"tool_format": "harmony"}, "rollout")


# ---- Qwen3-Coder's XML ------------------------------------------------------------------------------

def test_qwen3_coder_values_are_typed_by_the_schema() -> None:
    text = ("Let me check.\n" + xml_call("everything", text="two\nlines ", count="-12", ratio="2.5", flag="True",
                                         options='{"a": [1, 2]}', items="[1, \"x\"]", maybe="null", loose="7")
            + xml_call("everything", count="twelve", ratio="7", options="[1]", items="{bad"))
    first, second = Qwen3Coder().parse(text, [Everything()])
    assert first.error == "" and first.name == "everything"
    assert first.arguments == {"text": "two\nlines ", "count": -12, "ratio": 2.5, "flag": True,
                               "options": {"a": [1, 2]}, "items": [1, "x"], "maybe": None, "loose": "7"}
    assert second.arguments == {"count": "twelve", "ratio": 7, "options": "[1]", "items": "{bad"}, \
        "values that do not read as the declared type stay text, for the argument check to report"


def test_qwen3_coder_malformed_calls_are_error_calls() -> None:
    parse = Qwen3Coder().parse
    assert parse("no call here </tool_call>", []) == []
    assert "must hold one <function=NAME> block" in parse("<tool_call>\n{\"name\": \"add\"}\n</tool_call>", [])[0].error
    twice = parse(xml_call("add", a="1").replace("</function>", "<parameter=a>\n2\n</parameter>\n</function>"), [])
    assert twice[0].error == "parameter 'a' is given twice in the call to 'add'"
    unclosed = parse("<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n2", [Adder()])
    assert (unclosed[0].name, unclosed[0].arguments) == ("add", {"a": 1, "b": 2}), "a turn cut inside its call"
    unknown = parse(xml_call("multiply", a="1"), [Adder()])
    assert (unknown[0].name, unknown[0].arguments) == ("multiply", {"a": "1"}), "no schema: values stay text"


@pytest.mark.parametrize("arguments", [
    {"a": 1, "b": 2},
    {"text": "several\nlines\n\nof text", "count": 0, "ratio": 0.125, "flag": False},
    {"options": {"nested": {"k": [1, 2]}}, "items": ["x", 2, None], "maybe": None},
])
def test_qwen3_coder_reads_what_its_chat_template_writes(coder: Any, arguments: dict[str, Any]) -> None:
    """Calls rendered by the real template (as the model is trained to write them) parse back to the same calls."""
    tool = Adder() if "a" in arguments else Everything()
    calls = [{"type": "function", "function": {"name": tool.name, "arguments": arguments}}] * 2
    messages = [{"role": "user", "content": "q"}]
    prompt = coder.apply_chat_template(messages, tools=[tool.schema()], add_generation_prompt=True, tokenize=False)
    full = coder.apply_chat_template(messages + [{"role": "assistant", "content": "", "tool_calls": calls}],
                                     tools=[tool.schema()], tokenize=False)
    assert full.startswith(prompt.removesuffix("\n")), "the model continues the generation prompt"
    written = full[len(prompt):].removesuffix("<|im_end|>\n")
    assert written.startswith("<tool_call>\n<function=")
    parsed = Qwen3Coder().parse(written, [tool])
    assert [(c.name, c.arguments, c.error) for c in parsed] == [(tool.name, arguments, "")] * 2


def test_qwen3_coder_tool_loop_renders_with_its_template(coder: Any) -> None:
    """run_turns with `tool_format=qwen3_coder`: each turn's context is exactly Qwen3-Coder's template rendering
    of the conversation so far (tools listed in its XML, the typed call re-rendered, answers as
    <tool_response> blocks in a user turn), and the tool answers are out of the loss."""
    script = {"1+2+3?": [xml_call("add", a="1", b="2") + "\n" + xml_call("add", a="3", b="3"), "It is 6."]}
    engine = ScriptedEngine(coder, script)
    prompts = [Prompt(messages=[{"role": "user", "content": "1+2+3?"}])]
    batch = run_turns(engine, coder, prompts, SamplingParams(n=1, max_new_tokens=400), [Adder()],
                      TurnOptions(max_turns=3, tool_format="qwen3_coder"))
    batch.validate()
    tools = [Adder().schema()]
    calls = [{"type": "function", "function": {"name": "add", "arguments": args}}
             for args in ({"a": 1, "b": 2}, {"a": 3, "b": 3})]
    conversation = [{"role": "user", "content": "1+2+3?"}]
    first = coder.apply_chat_template(conversation, tools=tools, add_generation_prompt=True, tokenize=False)
    assert coder.decode(engine.contexts[0]) == first and "<name>add</name>" in first
    conversation += [{"role": "assistant", "content": "", "tool_calls": calls},
                     {"role": "tool", "content": "3"}, {"role": "tool", "content": "6"}]
    second = coder.apply_chat_template(conversation, tools=tools, add_generation_prompt=True, tokenize=False)
    assert coder.decode(engine.contexts[1]) == second
    assert batch.info[0]["tool_calls"] == 2 and batch.info[0]["tool_errors"] == 0 and batch.info[0]["turns"] == 2
    n = int(batch.attention_mask[0].sum())
    ids, mask = batch.response_ids[0, :n].tolist(), batch.response_mask[0, :n].tolist()
    assert coder.decode([t for t, m in zip(ids, mask) if m == 0]) == (
        "\n<|im_start|>user\n<tool_response>\n3\n</tool_response>\n<tool_response>\n6\n</tool_response>\n"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert batch.rollout_logprobs[0, :n].tolist() == [LOGPROB if m else 0.0 for m in mask]
    assert batch.info[0]["messages"][-1] == {"role": "assistant", "content": "It is 6."}


def test_the_format_decides_what_counts_as_a_call(coder: Any) -> None:
    """The same XML turn is a call under qwen3_coder and plain text under hermes."""
    engine = ScriptedEngine(coder, {"q": [xml_call("add", a="1", b="2"), "3"]})
    prompts = [Prompt(messages=[{"role": "user", "content": "q"}])]
    coded = run_turns(engine, coder, prompts, SamplingParams(n=1, max_new_tokens=400), [Adder()],
                      TurnOptions(max_turns=2, tool_format="qwen3_coder"))
    hermes = run_turns(ScriptedEngine(coder, {"q": [xml_call("add", a="1", b="2"), "3"]}), coder, prompts,
                       SamplingParams(n=1, max_new_tokens=400), [Adder()], TurnOptions(max_turns=2))
    assert coded.info[0]["tool_calls"] == 1 and coded.info[0]["tool_errors"] == 0
    assert hermes.info[0]["tool_calls"] == 1 and "not valid JSON" in hermes.info[0]["messages"][1]["content"]
