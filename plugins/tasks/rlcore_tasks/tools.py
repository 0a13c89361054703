"""Tools for multi-turn math rollouts: a safe calculator and the GSM8K answer check of verl's
`gsm8k_tool` recipe (`calc_gsm8k_reward`)."""

from __future__ import annotations

import ast
import math
import operator
import re
from fractions import Fraction
from typing import Any

import attrs

from rlcore import Prompt, Tool, ToolResult
from rlcore_tasks.answers import NUMBER, parse_number

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Pow: operator.pow}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
SYMBOLS = {ast.BitXor: "^", ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<",
           ast.RShift: ">>", ast.BitOr: "|", ast.BitAnd: "&"}
MAX_DIGITS = 100
"""Results (and powers) beyond 10**MAX_DIGITS are refused rather than computed."""
MAX_LENGTH = 1000
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class CalculatorError(ValueError):
    """An expression the calculator refuses; the message names the problem for the model."""


def _checked(value: Fraction | float) -> Fraction | float:
    """`value`, or CalculatorError when it has more than MAX_DIGITS digits."""
    if abs(value) >= 10 ** MAX_DIGITS:
        raise CalculatorError(f"result too large (more than {MAX_DIGITS} digits)")
    return value


def _power(base: Fraction | float, exponent: Fraction | float) -> Fraction | float:
    """base ** exponent, exact for whole exponents; refused when the result would need more than
    MAX_DIGITS digits before or after the decimal point."""
    if base != 0 and abs(exponent * math.log10(abs(base))) >= MAX_DIGITS:
        raise CalculatorError(f"result out of range (more than {MAX_DIGITS} digits)")
    if isinstance(exponent, Fraction) and exponent.denominator == 1:
        if base == 0 and exponent < 0:
            raise CalculatorError("division by zero")
        return base ** int(exponent)
    if base < 0:
        raise CalculatorError("a negative number to a fractional power is not a real number")
    return float(base) ** float(exponent)


def _evaluate(node: ast.AST) -> Fraction | float:
    """The value of an arithmetic syntax tree: numbers, + - * / ** and unary signs only."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(Fraction(str(node.value)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalculatorError("division by zero")
        return _checked(_power(left, right) if isinstance(node.op, ast.Pow) else BINARY[type(node.op)](left, right))
    if isinstance(node, ast.BinOp):
        symbol = SYMBOLS.get(type(node.op), type(node.op).__name__)
        hint = "; use ** for powers" if symbol == "^" else ""
        raise CalculatorError(f"operator '{symbol}' is not supported (only + - * / ** and parentheses){hint}")
    if isinstance(node, ast.Constant):
        raise CalculatorError(f"{node.value!r} is not a number")
    if isinstance(node, ast.Name):
        raise CalculatorError(f"unknown name '{node.id}': only numbers and + - * / ** are allowed")
    raise CalculatorError(f"{type(node).__name__} is not allowed: only numbers, + - * / ** and parentheses")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text: whole numbers without a decimal point, others to 10
    significant digits. Thousands commas and `$` are ignored; CalculatorError names any problem."""
    text = THOUSANDS.sub("", expression.replace("$", "")).strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_LENGTH:
        raise CalculatorError(f"expression longer than {MAX_LENGTH} characters")
    try:
        value = _evaluate(ast.parse(text, mode="eval"))
    except SyntaxError as e:
        raise CalculatorError(f"invalid expression {text!r}: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise CalculatorError("expression nested too deeply") from None
    if isinstance(value, Fraction) and value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


class Calculator(Tool):
    """Evaluates + - * / ** with parentheses and unary minus by walking the parsed expression (no eval)."""

    name = "calculator"
    description = "Evaluate an arithmetic expression with + - * / ** and parentheses, e.g. (48 + 24) / 2."
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "The expression, e.g. 12 * (3 + 4.5)"}},
        "required": ["expression"],
    }

    def execute(self, instance: Any, arguments: dict[str, Any]) -> ToolResult:
        """The value as text, or an error result naming what is wrong with the expression."""
        if "expression" not in arguments:
            return ToolResult("Error: missing argument 'expression'", error=True)
        try:
            return ToolResult(calculate(str(arguments["expression"])))
        except CalculatorError as e:
            return ToolResult(f"Error: {e}", error=True)


@attrs.define
class AnswerState:
    """One sample's answer check: its prompt and the reward of its latest submission."""

    prompt: Prompt
    reward: float = 0.0


class AnswerCheckTool(Tool):
    """A tool that grades a submitted answer (verl's `calc_*_reward` tools). The step reward is 0.0 when a
    submission improves on the previous one, else `no_improvement_penalty`, which discourages resubmitting
    without improving. Subclasses say how an answer is parsed and graded (`grade`)."""

    no_improvement_penalty = -0.05

    def grade(self, answer: str, prompt: Prompt) -> tuple[str, float]:
        """The parsed answer and its reward (1.0 correct, 0.0 otherwise)."""
        raise NotImplementedError

    def create(self, prompt: Prompt) -> AnswerState:
        """A fresh per-sample state."""
        return AnswerState(prompt=prompt)

    def execute(self, instance: AnswerState, arguments: dict[str, Any]) -> ToolResult:
        """Grade the answer; the text tells the model the parsed answer and its reward."""
        parsed, reward = self.grade(str(arguments.get("answer", "")), instance.prompt)
        step = 0.0 if reward > instance.reward else self.no_improvement_penalty
        instance.reward = reward
        return ToolResult(f"Current parsed answer={parsed!r} reward={reward}", reward=step)


class GSM8KAnswerCheck(AnswerCheckTool):
    """verl's `calc_gsm8k_reward`: 1.0 when the submitted answer's last number equals the ground truth."""

    name = "calc_gsm8k_reward"
    description = ("Check your final answer to the question: returns the parsed answer and its reward, "
                   "1.0 when correct and 0.0 otherwise.")
    parameters = {
        "type": "object",
        "properties": {"answer": {"type": ["string", "number"], "description": "The answer to the question"}},
        "required": ["answer"],
    }

    def grade(self, answer: str, prompt: Prompt) -> tuple[str, float]:
        """The answer as given; reward 0.0 when it holds no number."""
        found = NUMBER.findall(answer)
        return answer, float(bool(found) and parse_number(found[-1]) == parse_number(str(prompt.answer)))
