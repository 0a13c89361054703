"""From a model's response to sandbox runs and a pass count: code extraction, the HumanEval / MBPP
assert harness, and stdin/stdout comparison.

A problem's tests (`Prompt.answer`) are one of:
- `{"kind": "asserts", "prefix": str, "entry_point": str, "setup": str, "tests": [str, ...]}`: every test
  is Python run after the solution in its namespace, and passes when it raises nothing (HumanEval: one
  test, `check(entry_point)`; MBPP: one per assert). All tests share one run; each reports its outcome
  on stdout behind a per-program token as soon as it ends, so a hang or crash in one test fails that
  test and the later ones, and a program that exits early (`exit(0)` before the tests) passes none.
- `{"kind": "stdio", "cases": [{"input": str, "output": str}, ...]}`: one run per case, passed when
  the program exits with 0 and prints the expected output (compared as whitespace-separated tokens).

The token keeps a solution from passing by accident or by exiting early; it is not a defence against
code written to read the harness's own memory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import attrs

from rlcore_tasks.sandbox import RunResult

FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)
OPEN_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*)\Z", re.S)
PYTHON_TAGS = ("python", "python3", "py", "")

HARNESS = '''\
import os as _rlcore_os
_rlcore_ns = {{"__name__": "solution"}}
exec(compile({solution!r}, "solution.py", "exec"), _rlcore_ns)
exec(compile({setup!r}, "setup.py", "exec"), _rlcore_ns)
for _rlcore_i, _rlcore_test in enumerate({tests!r}):
    try:
        exec(compile(_rlcore_test, "test_%d.py" % _rlcore_i, "exec"), _rlcore_ns)
        _rlcore_ok = 1
    except BaseException:
        _rlcore_ok = 0
    _rlcore_os.write(1, ("\\n{token} %d %d\\n" % (_rlcore_i, _rlcore_ok)).encode())
'''
"""The assert-test program: the solution runs as module `solution` (so its `if __name__ == "__main__":`
block does not), then the setup code, then each test, each outcome written straight to fd 1."""


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


@attrs.frozen
class Plan:
    """The sandbox runs that test one response, and how their results become a count of passed tests."""

    runs: tuple[tuple[str, str], ...]
    """(program, stdin) pairs."""
    total: int
    """Number of tests."""
    token: str = ""
    """The assert harness's report token (asserts plans)."""
    expected: tuple[str, ...] = ()
    """Expected stdout of each run (stdio plans)."""

    def passed(self, results: Sequence[RunResult]) -> int:
        """Tests passed, from the results of `runs` in order."""
        if not results:
            return 0
        if self.token:
            reports = re.findall(rf"^{self.token} (\d+) ([01])$", results[0].stdout, re.M)
            return len({int(i) for i, ok in reports if ok == "1" and int(i) < self.total})
        return sum(r.exit_code == 0 and same_tokens(r.stdout, want) for r, want in zip(results, self.expected))


def make_plan(tests: dict[str, Any], code: str | None, key: bytes) -> Plan:
    """The runs testing `code` against a problem's `tests` (see the module doc); no runs without code.
    The report token is a keyed hash of the program, so equal responses give equal programs."""
    if tests["kind"] == "stdio":
        cases = tests["cases"]
        if code is None:
            return Plan(runs=(), total=len(cases))
        return Plan(runs=tuple((code, c["input"]) for c in cases), total=len(cases),
                    expected=tuple(c["output"] for c in cases))
    if code is None:
        return Plan(runs=(), total=len(tests["tests"]))
    solution = solution_source(tests["prefix"], tests["entry_point"], code)
    parts = (solution, tests["setup"], *tests["tests"])
    token = hashlib.blake2b(repr(parts).encode(), key=key, digest_size=16).hexdigest()
    program = HARNESS.format(solution=solution, setup=tests["setup"], tests=list(tests["tests"]), token=token)
    return Plan(runs=((program, ""),), total=len(tests["tests"]), token=token)
