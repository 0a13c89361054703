"""The judge, where assert tests run and verdicts are decided: what it asks the sandbox (operations, never
expected values), how it takes the sandbox's answers (plain data only: references, exceptions, missing
or malformed results fail), the passes and runs a problem takes, and the judge process's own bounds."""

from __future__ import annotations

import sys
import time

import pytest

from rlcore_tasks import judge as judge_module
from rlcore_tasks.codecheck import MAX_RUNS, frames, make_plan
from rlcore_tasks.judge import FAILED, PASSED, WAITING, BadProblem, JudgeError, Judges
from rlcore_tasks.plaindata import decode, encode, extension
from rlcore_tasks.sandbox import BwrapSandbox, Limits

SOURCE = judge_module.JUDGE.replace("\njudge_main()\n", "\n")
JUDGE: dict = {}
exec(compile(SOURCE, "judge", "exec"), JUDGE)  # noqa: S102 - the judge's own code, to call `judge` in-process
judge = JUDGE["judge"]


def problem(tests: list[str], setup: str = "", prefix: str = "", entry_point: str = "", shadowed: tuple = ()):
    return (prefix, entry_point, setup, tuple(tests), shadowed)


def ops_of(p) -> list[tuple]:
    """The operations of a first pass, decoded (references shown as ("ref", k))."""
    _, ops = judge(p, [], [])
    return [decode(op, {b"R": lambda k: ("ref", k), b"G": lambda n: ("builtin", n)}) for op in ops]


MISSING = object()
"""No result frame for an operation."""


def answered(p, results: list) -> list[int]:
    """Verdicts of a second pass whose operations are answered with `results` (values, raw frames, MISSING)."""
    _, ops = judge(p, [], [])
    frames_ = [None if r is MISSING else r if isinstance(r, bytes) else encode(r) for r in results]
    outcomes, again = judge(p, ops, frames_)
    assert again == ops
    return outcomes


# ---- what the sandbox is asked --------------------------------------------------------------------

def test_the_sandbox_gets_the_calls_never_the_expected_values():
    p = problem(["assert f(2) == 'EXPECTED-1'", "assert g([1, 2], k=3) != {'EXPECTED-2'}"])
    assert judge(p, [], [])[0] == [WAITING, WAITING]
    assert ops_of(p) == [("call", "f", (2,), {}), ("call", "g", ([1, 2],), {"k": 3})]
    assert b"EXPECTED" not in b"".join(judge(p, [], [])[1])


def test_one_pass_records_every_call_of_a_humaneval_check():
    """Asserts are rewritten so that a check waiting for its first result goes on to record the rest;
    `random` is seeded per test, so the second pass asks for the same calls."""
    test = ("import random\n\ndef check(candidate):\n    assert candidate(1) == 2\n"
            "    for _ in range(3):\n        x = random.randint(0, 100)\n        assert candidate(x) == x + 1\n\n"
            "check(inc)\n")
    p = problem([test], prefix="def inc(x):\n    '''Add one.'''\n", entry_point="inc")
    calls = ops_of(p)
    assert len(calls) == 4 and all(c[:2] == ("call", "inc") for c in calls)
    results = [c[2][0] + 1 for c in calls]
    assert answered(p, results) == [PASSED]
    assert answered(p, [2, *results[1:3], 0]) == [FAILED]


def test_prompt_helpers_run_in_the_judge():
    """HumanEval's helpers (here `encode_shift`) are the prompt's own, whatever the solution defines."""
    prefix = "def encode_shift(s):\n    return ''.join(chr(ord(c) + 1) for c in s)\n\ndef decode_shift(s):\n    '''.'''\n"
    test = "def check(candidate):\n    assert candidate(encode_shift('abc')) == 'abc'\n\ncheck(decode_shift)\n"
    p = problem([test], prefix=prefix, entry_point="decode_shift")
    assert ops_of(p) == [("call", "decode_shift", ("bcd",), {})]
    assert answered(p, ["abc"]) == [PASSED]


def test_setup_objects_stay_in_the_sandbox_and_are_passed_by_reference():
    """MBPP 367's setup builds a tree of the solution's Node class: every step is an operation."""
    p = problem(["assert balanced(root) == False"], setup="root = Node(1)\nroot.left = Node(2)\nroot.left.left = Node(3)")
    assert ops_of(p) == [("call", "Node", (1,), {}), ("call", "Node", (2,), {}), ("setattr", ("ref", 0), "left", ("ref", 1)),
                         ("call", "Node", (3,), {}), ("getattr", ("ref", 0), "left"),
                         ("setattr", ("ref", 4), "left", ("ref", 3)), ("call", "balanced", (("ref", 0),), {})]
    refs = [bytes(extension(b"R", k)) for k in range(5)]
    assert answered(p, [*refs[:2], None, *refs[3:5], None, False]) == [PASSED]
    assert answered(p, [*refs[:2], None, *refs[3:5], None, True]) == [FAILED]


def test_builtins_the_solution_is_to_define_and_builtins_as_arguments():
    assert ops_of(problem(["assert sum(10, 15) == 6"])) == []  # the builtin: nothing to ask
    assert ops_of(problem(["assert sum(10, 15) == 6"], shadowed=("sum",))) == [("call", "sum", (10, 15), {})]
    assert ops_of(problem(["assert remove((4, 7.7), int) == [7.7]"])) == [
        ("call", "remove", ((4, 7.7), ("builtin", "int")), {})]


def test_what_cannot_be_sent_fails_the_test():
    p = problem(["assert apply(lambda x: x, 3) == 3", "assert f(1) == 1"])
    outcomes, ops = judge(p, [], [])
    assert outcomes == [FAILED, WAITING] and len(ops) == 1


# ---- how answers are taken -----------------------------------------------------------------------------

def test_plain_answers_are_compared_in_the_judge():
    p = problem(["assert f(1) == [1, 2]", "assert f(2) == (1, 2)", "assert abs(f(3) - 0.5) < 1e-9",
                 "assert f(4) is None", "assert f(5)"])
    assert answered(p, [[1, 2], (1, 2), 0.5, None, 1]) == [PASSED] * 5
    assert answered(p, [(1, 2), [1, 2], float("nan"), 0, 0]) == [FAILED] * 5


def test_an_object_equal_to_everything_can_only_come_back_as_a_reference_and_fails():
    """The sandbox sends anything that is not plain data as a reference; looking into one fails the
    test for good, even when the test swallows the error."""
    ref = bytes(extension(b"R", 0))
    for test in ("assert f() == 5", "assert f() != 5", "assert f()", "assert not f()", "assert 5 in [f()]",
                 "assert str(f()) == '5'", "assert hash(f()) or True", "assert [x for x in f()] == [5]",
                 "try:\n    assert f() == 5\nexcept BaseException:\n    pass"):
        assert answered(problem([test]), [ref]) == [FAILED], test


@pytest.mark.parametrize("frame", [
    MISSING, b"", b"garbage", b"R5;", b"l1:R0;", b"i1;i2;", encode([1])[:-1], b"E3:abc" + b"x",
])
def test_missing_or_malformed_results_fail(frame):
    assert answered(problem(["assert f() == 1", "x = f()"]), [frame, frame]) == [FAILED, FAILED]


def test_exceptions_come_back_by_name_only():
    p = problem(["try:\n    f()\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError",
                 "assert f() == 1", "assert f() == 1"])
    raised = [bytes(extension(b"E", n)) for n in ("ValueError", "SystemExit", "Pending")]
    assert answered(p, raised) == [PASSED, FAILED, FAILED]
    assert answered(p, [raised[1], *raised[1:]]) == [FAILED, FAILED, FAILED]


def test_later_results_may_depend_on_earlier_ones():
    """`f(f(1))`: the inner result is unknown in the first pass, so the outer call is asked by reference,
    then, once known, by value: three passes, two runs."""
    p = problem(["assert f(f(1)) == 3"])
    outcomes, ops = judge(p, [], [])
    assert outcomes == [WAITING] and len(ops) == 2
    outcomes, ops = judge(p, ops, [encode(2), encode(3)])
    assert outcomes == [WAITING] and len(ops) == 3
    assert judge(p, ops, [encode(2), encode(3), encode(3)])[0] == [PASSED]


def test_setup_failure_and_uncompilable_tests():
    assert answered(problem(["assert True"], setup="raise ValueError"), []) == [FAILED]
    with pytest.raises(SyntaxError):
        judge(problem(["assert ("]), [], [])


# ---- judge processes and runs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judges():
    j = Judges(sys._base_executable, 256 << 20, 2)
    yield j
    j.close()


def test_a_judge_process_answers_and_reports_problems_that_cannot_run(judges):
    p = problem(["assert f(2) == 4"])
    outcomes, ops = judges.get().ask(p, [], [], 10)
    assert outcomes == [WAITING]
    assert judges.get().ask(p, ops, [encode(4)], 10) == ([PASSED], ops)
    with pytest.raises(BadProblem, match="SyntaxError"):
        judges.get().ask(problem(["assert ("]), [], [], 10)


def test_a_judge_that_hangs_on_what_a_solution_returned_is_killed_and_replaced(judges):
    p = problem(["for _ in range(f()):\n    pass"])
    first = judges.get()
    _, ops = first.ask(p, [], [], 10)
    start = time.monotonic()
    with pytest.raises(JudgeError, match="no answer in time"):
        first.ask(p, ops, [encode(10 ** 15)], 1.0)
    assert time.monotonic() - start < 3 and not first.alive
    assert judges.get() is not first and judges.get().ask(p, ops, [encode(3)], 10)[0] == [PASSED]


def test_a_judge_out_of_memory_fails_the_test_not_the_judge(judges):
    p = problem(["assert len(f() * (1 << 40)) > 0", "assert f() == 'ab'"])
    _, ops = judges.get().ask(p, [], [], 10)
    assert judges.get().ask(p, ops, [encode("ab"), encode("ab")], 10)[0] == [FAILED, PASSED]


def test_frames_of_a_results_channel():
    data = b"3:i1;" + b"1:N" + b"4:s1:"  # the last one cut short
    assert frames(data, 4) == [b"i1;", b"N", None, None]
    assert frames(b"x:N", 1) == [None] and frames(b"", 0) == []


@pytest.fixture(scope="module")
def sandbox():
    return BwrapSandbox(Limits(timeout_s=10, cpu_s=5))


def test_runs_per_problem(sandbox, judges):
    """One run for independent calls, two when a call takes an earlier result, never more than MAX_RUNS."""
    calls = []
    call = sandbox.call

    class Counting:
        def call(self, *args):
            calls.append(1)
            return call(*args)

    def runs(code: str, tests: list[str]) -> tuple[int, int]:
        calls.clear()
        plan = make_plan({"kind": "asserts", "prefix": "", "entry_point": "", "setup": "", "tests": tests}, code)
        return plan.check(Counting(), judges, 10).passed, len(calls)

    assert runs("def f(x):\n    return x + 1", ["assert f(1) == 2", "assert f(2) == 3"]) == (2, 1)
    assert runs("def f(x):\n    return x + 1", ["assert f(f(1)) == 3"]) == (1, 2)
    deep = "assert " + "f(" * 10 + "0" + ")" * 10 + " == 10"
    assert runs("def f(x):\n    return x + 1", [deep]) == (0, MAX_RUNS)
