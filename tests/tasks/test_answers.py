"""Answer extraction: GSM8K numbers, `\\boxed{}` contents, DAPO's `Answer:` line, tool-output removal."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlcore_tasks.answers import (answer_line, gsm8k_answer, gsm8k_reference, last_boxed, plain_number,
                                  without_tool_responses)


@pytest.mark.parametrize(("text", "strict", "flexible"), [
    ("#### 72", 72, 72),
    ("so 48+24=72\n#### 72", 72, 72),
    ("####72", 72, 72),
    ("#### 1,234", 1234, 1234),
    ("#### $1,234.50", Fraction(2469, 2), Fraction(2469, 2)),
    ("#### 72.0", 72, 72),
    ("#### -3", -3, -3),
    ("#### 5 then 6", 5, 6),
    ("#### 5\nactually\n#### 6", 6, 6),
    ("The answer is 72.", None, 72),
    ("5-3=2", None, 2),
    ("it costs -$4", None, -4),
    ("the numbers 1,2,3", None, 3),
    ("#### seventy", None, None),
    ("", None, None),
    ("no digits here", None, None),
])
def test_gsm8k_extraction(text, strict, flexible):
    assert gsm8k_answer(text, "strict") == strict
    assert gsm8k_answer(text, "flexible") == flexible


@given(st.integers(-10**9, 10**9))
def test_a_written_number_reads_back_in_every_style(n):
    for written in (str(n), f"{n:,}", f"{n}.0", f"${n:,}" if n >= 0 else f"-${-n:,}"):
        assert gsm8k_answer(f"so the total is\n#### {written}", "strict") == n
        assert gsm8k_answer(f"the total is {written}.", "flexible") == n


def test_reference_answers_and_plain_numbers():
    assert gsm8k_reference("48/2 = <<48/2=24>>24\n#### 1,000") == "1000"
    assert gsm8k_reference("#### -7") == "-7"
    assert plain_number(" $2.50 ") == "2.50"
    for bad in ("no marker 72", "#### ", "#### 7 apples", "#### x"):
        with pytest.raises(ValueError):
            gsm8k_reference(bad)
    with pytest.raises(ValueError, match="is not a number"):
        plain_number("1/2")


@pytest.mark.parametrize(("text", "boxed"), [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{x^{2^{3}}} done", "x^{2^{3}}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\fbox{42}", "42"),
    (r"\boxed {7}", "7"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{\frac{1}{2}", None),
    (r"\boxed{ }", None),
    ("no box", None),
    (r"\fboxsep=3pt", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(("text", "answer"), [
    ("work...\nAnswer: 42", "42"),
    ("Answer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("answer: 3\nso\nANSWER : 5", "5"),
    ("Answer: \\boxed{7}", "7"),
    ("The final answer is 5", None),
    ("Answer:   \n", None),
])
def test_answer_line(text, answer):
    assert answer_line(text) == answer


def test_tool_responses_are_removed_even_when_cut_off():
    text = "a\n<tool_response>\n#### 99\n</tool_response>\nb #### 7 <tool_response>\n1.0"
    assert without_tool_responses(text) == "a\n\nb #### 7 "
