"""Reading the final answer out of a response: GSM8K numbers (`#### N` or the last number), the contents
of `\\boxed{}` and DAPO's `Answer: X` line."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

NUMBER = re.compile(r"(?<![\d.])-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
"""An integer or decimal with an optional sign, `$` and thousands commas ("-$1,234.50"). A '-' counts as a
sign only when no digit precedes it, so "5-3" reads as 5 and 3."""
STRICT = re.compile(r"####\s*(" + NUMBER.pattern + ")")
BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*(\{)?")
ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")
TOOL_RESPONSE = re.compile(r"<tool_response>.*?(?:</tool_response>|$)", re.DOTALL)


def parse_number(text: str) -> Fraction:
    """The exact value of a number as NUMBER matches it: "$1,234.50" -> 2469/2, "72.0" -> 72."""
    return Fraction(text.replace(",", "").replace("$", ""))


def gsm8k_answer(text: str, mode: str) -> Fraction | None:
    """The number a response answers with: after its last `####` (`strict`), or its last number
    (`flexible`); None when there is none."""
    if mode == "strict":
        found = STRICT.findall(text)
    else:
        found = NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def plain_number(text: str) -> str:
    """One number as plain text ("$1,000" -> "1000"); ValueError when `text` is not exactly one number."""
    text = text.strip()
    if not NUMBER.fullmatch(text):
        raise ValueError(f"{text[:60]!r} is not a number")
    return text.replace(",", "").replace("$", "")


def gsm8k_reference(solution: str) -> str:
    """The final answer of a GSM8K reference solution (the number after its last `####`) as plain text;
    ValueError when there is none."""
    _, sep, tail = solution.rpartition("####")
    if not sep:
        raise ValueError("no '#### <answer>' line")
    return plain_number(tail)


def without_tool_responses(text: str) -> str:
    """`text` less the `<tool_response>` blocks that chat templates wrap tool output in."""
    return TOOL_RESPONSE.sub("", text)


def final_turns(texts: list[str], infos: list[dict[str, Any]]) -> list[str]:
    """Each response's last assistant turn, which multi-turn rollouts record in `info["messages"]` (so tool
    output and the calls' own numbers are not read as the answer); the whole text where there is none."""
    out = []
    for text, info in zip(texts, infos or [{}] * len(texts)):
        turns = [m.get("content") or "" for m in info.get("messages") or [] if m.get("role") == "assistant"]
        out.append(turns[-1] if turns else text)
    return out


def _braced(text: str, start: int) -> str | None:
    """The text from `start` up to the brace closing an already opened `{`; None when it never closes.
    Escaped braces (`\\{`, `\\}`) do not count."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[start:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` or `\\fbox{...}` (nested braces included), or of a
    `\\boxed 5` without braces; None when there is none, it is empty or it never closes."""
    matches = list(BOX.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    if m.group(1):
        inner = _braced(text, m.end())
    else:
        token = re.match(r"[^\s$]+", text[m.end():])
        inner = token.group(0) if token else None
    return (inner.strip() or None) if inner else None


def answer_line(text: str) -> str | None:
    """The answer on DAPO's last `Answer: X` line, without surrounding `$` or a final period (and the
    contents of a `\\boxed{}` written there); None when there is no such line."""
    found = ANSWER_LINE.findall(text)
    if not found:
        return None
    answer = found[-1].strip().rstrip(".").strip().strip("$").strip()
    if BOX.search(answer):
        return last_boxed(answer)
    return answer or None


def latex_problem(text: str) -> str | None:
    """Why `text` cannot be a parseable LaTeX answer (empty, unbalanced braces, `\\left` without `\\right`, a
    dangling `^`, `_` or backslash), or None. A cheap check for reference answers at load time: a reference
    that math-verify cannot parse would make every response score 0."""
    body = text.strip().strip("$").strip()
    if not body:
        return "it is empty"
    depth = 0
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return "a '}' closes no '{'"
        i += 1
    if depth > 0:
        return f"{depth} '{{' never closed"
    lefts, rights = len(re.findall(r"\\left(?![A-Za-z])", body)), len(re.findall(r"\\right(?![A-Za-z])", body))
    if lefts != rights:
        return f"{lefts} \\left but {rights} \\right"
    if re.search(r"(?:[\^_]|(?<!\\)\\)$", body):
        return f"it ends in {body[-1]!r}"
    return None
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_tagged(text: str) -> str | None:
    """Megatron-LM's math answer (examples/rl, `answer_format="tagged"`): the contents of the last
    `<answer>...</answer>`, counted only when nothing but whitespace follows it (Megatron-LM gives the reward
    only when an end-of-text token comes right after), else the last `\\boxed{}` under the same rule; None
    otherwise."""
    tags = list(ANSWER_TAG.finditer(text))
    if tags:
        last = tags[-1]
        return (last.group(1).strip() or None) if not text[last.end():].strip() else None
    boxed = last_boxed(text)
    if boxed is None:
        return None
    return boxed if text.rstrip().endswith("}") and last_boxed(text.rstrip()) == boxed else None
