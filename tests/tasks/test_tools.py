"""The calculator and GSM8K answer-check tools: safe evaluation, error results, verl's step rewards, and
their specs rendered by the real Qwen3 chat template."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcore import Prompt, Tool, ToolResult
from rlcore.config import build_options
from rlcore_tasks.gsm8k import GSM8K
from rlcore_tasks.tools import Calculator, GSM8KAnswerCheck, calculate

QWEN3 = Path(__file__).resolve().parents[1] / "data" / "qwen3-tokenizer"


def run(expression: str) -> ToolResult:
    return Calculator().execute(None, {"expression": expression})


# ---- calculator ---------------------------------------------------------------------------------------

def expressions() -> st.SearchStrategy[str]:
    """Random arithmetic over small numbers with + - * / ** (small exponents), unary minus and parentheses."""
    number = st.one_of(st.integers(0, 999).map(str), st.decimals(0, 99, places=2).map(str))
    def grow(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(inner, st.integers(0, 3)).map(lambda t: f"({t[0]}) ** {t[1]}"),
            inner.map(lambda e: f"-{e}"))
    return st.recursive(number, grow, max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(expressions())
def test_calculator_agrees_with_python(expression):
    try:
        expected = eval(expression)  # noqa: S307 - the strategy builds only numbers and operators
    except ZeroDivisionError:
        result = run(expression)
        assert result.error and "division by zero" in result.text
        return
    result = run(expression)
    assert not result.error, result.text
    assert math.isclose(float(result.text), expected, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize(("expression", "value"), [
    ("(48 + 24) / 2", "36"), ("48/2", "24"), ("7/2", "3.5"), ("0.1 + 0.2", "0.3"), ("-3**2", "-9"),
    ("(-3)**2", "9"), ("2**-3", "0.125"), ("1/3", "0.3333333333"), ("1,000 * 3", "3000"), ("$12 * 5", "60"),
    ("+5", "5"), ("2 ** 0.5", "1.414213562"),
])
def test_calculator_results_are_plain_numbers(expression, value):
    assert run(expression) == ToolResult(value)


@pytest.mark.parametrize(("expression", "problem"), [
    ("1/0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("2^3", "use ** for powers"),
    ("7 // 2", "'//' is not supported"),
    ("7 % 2", "'%' is not supported"),
    ("x + 1", "unknown name 'x'"),
    ("abs(-1)", "Call is not allowed"),
    ("(1).real", "Attribute is not allowed"),
    ("'a' * 3", "'a' is not a number"),
    ("[1, 2]", "List is not allowed"),
    ("1 +", "invalid expression"),
    ("", "empty expression"),
    ("9 ** 9 ** 9", "out of range"),
    ("10 ** 99 * 10 ** 99", "too large"),
    ("(-8) ** (1/3)", "not a real number"),
    ("1" * 2000, "longer than"),
])
def test_calculator_errors_name_the_problem(expression, problem):
    result = run(expression)
    assert result.error and problem in result.text and result.reward == 0.0


def test_calculator_runs_no_code_and_refuses_huge_work_quickly(tmp_path):
    marker = tmp_path / "pwned"
    for attack in (f"__import__('os').system('touch {marker}')", f"open('{marker}', 'w')",
                   "().__class__.__bases__[0].__subclasses__()", "lambda: 1", "[x for x in ()]"):
        assert run(attack).error
    assert not marker.exists()
    start = time.perf_counter()
    for huge in ("9**9**9**9", "(10**99)**(10**99)", "0.5**10**9", "(1+1)" + "**2" * 30):
        assert run(huge).error
    assert time.perf_counter() - start < 1.0


def test_calculator_needs_an_expression_argument():
    assert Calculator().execute(None, {}) == ToolResult("Error: missing argument 'expression'", error=True)
    assert Calculator().execute(None, {"expression": 12}) == ToolResult("12")
    assert calculate("2*(3+4)") == "14"


# ---- answer check ---------------------------------------------------------------------------------------

def test_answer_check_step_rewards_follow_the_recipe():
    """verl's calc_gsm8k_reward: 1.0 for a correct answer; the step reward is 0 when the submission
    improves on the previous one and -0.05 otherwise."""
    tool = GSM8KAnswerCheck()
    state = tool.create(Prompt(messages=[], answer="1000"))
    steps = []
    for answer in ["999", "1,000", "#### $1000", "12", "1000.0"]:
        result = tool.execute(state, {"answer": answer})
        assert not result.error and f"answer={answer!r}" in result.text
        steps.append((result.text.endswith("reward=1.0"), result.reward))
    assert steps == [(False, -0.05), (True, 0.0), (True, -0.05), (False, -0.05), (True, 0.0)]


def test_answer_check_keeps_one_state_per_sample_and_tolerates_junk():
    tool = GSM8KAnswerCheck()
    a, b = tool.create(Prompt(messages=[], answer="7")), tool.create(Prompt(messages=[], answer="-3"))
    assert tool.execute(a, {"answer": "7"}).reward == 0.0
    assert tool.execute(b, {"answer": "7"}).reward == -0.05
    assert tool.execute(b, {"answer": "the answer is -3"}).reward == 0.0
    assert (a.reward, b.reward) == (1.0, 1.0)
    assert tool.execute(tool.create(Prompt(messages=[], answer="7")), {"answer": 7.0}).text.endswith("reward=1.0")
    junk = tool.create(Prompt(messages=[], answer="7"))
    for args in ({}, {"answer": "seven"}, {"answer": None}):
        result = tool.execute(junk, args)
        assert result.text.endswith("reward=0.0") and result.reward == -0.05
    tool.release(a)


def test_tools_are_core_tools_with_valid_schemas():
    for tool in (Calculator(), GSM8KAnswerCheck()):
        assert isinstance(tool, Tool)
        spec = tool.schema()
        assert spec["function"]["name"] == tool.name and json.loads(json.dumps(spec)) == spec
        params = spec["function"]["parameters"]
        assert params["type"] == "object" and set(params["required"]) <= set(params["properties"])


# ---- rendered by the real Qwen3 chat template --------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN3))


def test_qwen3_template_offers_the_tools_to_the_model(qwen3):
    task = GSM8K(build_options(GSM8K.Options, {"multi_turn": True}, "task"))
    tools = task.tools()
    prompt = task.prompt({"question": "What is 48 + 24?", "answer": "48+24=72\n#### 72"}, "p", 0)
    text = qwen3.apply_chat_template(prompt.messages, tools=[t.schema() for t in tools], add_generation_prompt=True,
                                     tokenize=False)
    assert [t.name for t in tools] == ["calculator", "calc_gsm8k_reward"]
    block = text[text.index("<tools>\n"):text.index("\n</tools>")]
    for tool in tools:
        assert json.dumps(tool.schema(), ensure_ascii=False) in block
    assert text.index(prompt.messages[0]["content"]) < text.index("<tools>\n")
    assert "What is 48 + 24?" in text.split("\n</tools>")[1]
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_qwen3_template_renders_a_tool_turn_with_the_tool_output(qwen3):
    calc = Calculator()
    result = calc.execute(None, {"expression": "48 + 24"})
    messages = [{"role": "user", "content": "What is 48 + 24?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "48 + 24"}}}]},
                {"role": "tool", "content": result.text}]
    text = qwen3.apply_chat_template(messages, tools=[calc.schema()], add_generation_prompt=True, tokenize=False)
    assert '{"name": "calculator", "arguments": {"expression": "48 + 24"}}' in text
    assert "<tool_response>\n72\n</tool_response>" in text
