"""From a model's response to a count of passed tests: code extraction, assert tests judged outside the
sandbox, and stdin/stdout comparison.

A problem's tests (`Prompt.answer`) are one of:
- `{"kind": "asserts", "prefix": str, "entry_point": str, "setup": str, "tests": [str, ...], "shadowed":
  [str, ...]}`: Python tests of a solution (HumanEval: one test, `check(entry_point)`; MBPP: one per
  assert), each passing when it raises nothing; `shadowed` (optional) names builtins that the solution
  is to define (MBPP's `sum`), which the tests then take from the solution. They run in a judge process
  (`rlcore_tasks.judge`), never in the sandbox: the sandbox runs the solution and replays the operations
  the tests make on it (calls, with their arguments), returning each result as plain data; the judge
  compares. A solution can only choose its
  own results, never see the expected ones or a verdict. Most problems take one sandbox run; tests whose
  calls depend on earlier results take more (at most `MAX_RUNS`), and a run that hangs or ends early
  fails the tests whose results it did not give.
- `{"kind": "stdio", "cases": [{"input": str, "output": str}, ...]}`: one run per case, passed when
  the program exits with 0 and prints the expected output (compared as whitespace-separated tokens).
  The expected output never enters the sandbox either.
"""

from __future__ import annotations

import ast
import re
import warnings
from typing import Any

import attrs

from rlcore_tasks.judge import PASSED, WAITING, JudgeError, Judges, Problem
from rlcore_tasks.sandbox import RunResult

FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)
OPEN_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*)\Z", re.S)
PYTHON_TAGS = ("python", "python3", "py", "")
MAX_RUNS = 3
"""Sandbox runs one response's assert tests may take (each replays every operation so far)."""


def extract_code(text: str) -> str | None:
    """The code of a response: its last ```python (or untagged) fenced block, else the rest of an
    unclosed one after the last closed block (a truncated response), else the whole text when it has
    no fence at all; None when there is nothing else."""
    blocks, end = [], 0
    for m in FENCE.finditer(text):
        end = m.end()
        if m.group(1).lower() in PYTHON_TAGS:
            blocks.append(m.group(2))
    if blocks:
        return blocks[-1]
    unclosed = OPEN_FENCE.search(text, end)
    if unclosed and unclosed.group(1).lower() in PYTHON_TAGS:
        return unclosed.group(2)
    return text if "```" not in text and text.strip() else None


def solution_source(prefix: str, entry_point: str, code: str) -> str:
    """The solution as a module. With a HumanEval `prefix` (imports, helpers, the signature and docstring):
    a response that defines `entry_point` itself follows the prefix (its definition wins), and one that
    does not is taken as the function's body, completing the prefix."""
    if not prefix:
        return code
    if entry_point and re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", code, re.M):
        return f"{prefix}\n\n{code}"
    return prefix + code


def same_tokens(output: str, expected: str) -> bool:
    """Whether two outputs hold the same whitespace-separated tokens."""
    return output.split() == expected.split()


def parse_quietly(source: str) -> ast.Module | None:
    """The syntax tree of a dataset's code, without its warnings (MBPP's invalid escapes); None when it
    does not parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(source)
        except SyntaxError:
            return None


def import_lines(*sources: str) -> str:
    """The top-level import statements of `sources` (the tests'), which the solution may rely on as it
    could when tests and solution shared a module; they carry no expected value."""
    trees = [tree for tree in map(parse_quietly, sources) if tree is not None]
    return "\n".join(ast.unparse(n) for tree in trees for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


@attrs.frozen
class Checked:
    """How one response did against its problem's tests."""

    passed: int
    timed_out: bool = False


@attrs.frozen
class AssertPlan:
    """A solution and the assert tests judging it."""

    solution: str
    """The solution as a module (a HumanEval prompt completed with the response)."""
    imports: str
    """The tests' import lines, run after the solution in its namespace."""
    problem: Problem
    total: int

    def check(self, sandbox: Any, judges: Judges, timeout_s: float) -> Checked:
        """Judge passes and sandbox runs in turn, until every test is decided or MAX_RUNS runs are done."""
        ops: list[bytes] = []
        results: list[bytes | None] = []
        timed_out = False
        for run in range(MAX_RUNS + 1):
            try:
                outcomes, wanted = judges.get().ask(self.problem, ops, results, timeout_s)
            except JudgeError:  # it died or hung on what this solution returned: nothing passes
                return Checked(passed=0, timed_out=timed_out)
            if WAITING not in outcomes or run == MAX_RUNS or wanted == ops:
                break
            ops = wanted
            result: RunResult = sandbox.call(self.solution, self.imports, ops)
            timed_out = timed_out or result.timed_out
            results = frames(result.results, len(ops))
        return Checked(passed=outcomes.count(PASSED), timed_out=timed_out)


@attrs.frozen
class StdioPlan:
    """A program and its stdin/stdout cases."""

    program: str
    cases: tuple[tuple[str, str], ...]
    """(input, expected output) pairs."""

    @property
    def total(self) -> int:
        return len(self.cases)

    def check(self, sandbox: Any, judges: Judges, timeout_s: float) -> Checked:
        """Run the program on each case in turn, comparing its output outside the sandbox."""
        runs = [sandbox.run(self.program, stdin) for stdin, _ in self.cases]
        passed = sum(r.exit_code == 0 and same_tokens(r.stdout, want) for r, (_, want) in zip(runs, self.cases))
        return Checked(passed=passed, timed_out=any(r.timed_out for r in runs))


Plan = AssertPlan | StdioPlan


def frames(data: bytes, count: int) -> list[bytes | None]:
    """The first `count` `<length>:<bytes>` frames of a results channel; None for each one missing (the
    run ended, or wrote something else, before it)."""
    found: list[bytes | None] = []
    pos = 0
    while len(found) < count:
        colon = data.find(b":", pos, pos + 12)
        if colon < 0 or not data[pos:colon].isdigit():
            break
        end = colon + 1 + int(data[pos:colon])
        if end > len(data):
            break
        found.append(data[colon + 1:end])
        pos = end
    return found + [None] * (count - len(found))


def make_plan(tests: dict[str, Any], code: str | None) -> Plan | int:
    """How to test `code` against a problem's `tests` (see the module doc); without code, the number of
    tests (none passed)."""
    if tests["kind"] == "stdio":
        cases = tuple((c["input"], c["output"]) for c in tests["cases"])
        return len(cases) if code is None else StdioPlan(program=code, cases=cases)
    if code is None:
        return len(tests["tests"])
    setup, test_list = tests["setup"], tuple(tests["tests"])
    problem = (tests["prefix"], tests["entry_point"], setup, test_list, tuple(tests.get("shadowed", ())))
    return AssertPlan(solution=solution_source(tests["prefix"], tests["entry_point"], code),
                      imports=import_lines(setup, *test_list), problem=problem, total=len(test_list))
