"""Programming problems from HumanEval, MBPP and stdin/stdout rows, as Prompts asking for a ```python
block, with the tests (`codecheck`'s format) as the answer.

Row formats (`detect` tells them apart):
- humaneval: `task_id`, `prompt` (signature + docstring), `entry_point`, `test` (defines `check`).
- mbpp: `task_id`, `text` (or `prompt`, as in MBPP's sanitized set), `test_list` (asserts), optional
  `test_setup_code` / `test_imports`; the first test shows the model the function's name and signature.
  The reference `code`, when there, tells which builtin names the tests mean the solution's for.
- stdio: `question` (or `problem`), and the cases as `inputs` + `outputs` lists or APPS's `input_output`
  (a dict or its JSON text); or a verl row (`prompt` chat messages, `reward_model.ground_truth` holding
  that JSON), whose messages are used unchanged.
"""

from __future__ import annotations

import ast
import builtins
import json
from collections.abc import Mapping
from typing import Any

from rlcore import Prompt
from rlcore_tasks.codecheck import parse_quietly
from rlcore_tasks.datafiles import BadRow, field, is_verl_row, verl_fields

FORMATS = ("auto", "humaneval", "mbpp", "stdio")
HUMANEVAL = ("Complete the following Python function. Answer with the whole function, imports included, in a "
             "single ```python code block.\n\n```python\n{prompt}```")
MBPP = ("You are an expert Python programmer, and here is your task: {text} Your code should pass these "
        "tests:\n\n{tests}\n\nAnswer with the code in a single ```python code block.")
STDIO = ("{question}\n\nWrite a Python 3 program that reads the input from standard input and prints the "
         "answer to standard output. Answer with the whole program in a single ```python code block.")


def detect(row: Mapping[str, Any]) -> str:
    """The format of one row, from its fields."""
    if "entry_point" in row and "test" in row:
        return "humaneval"
    if "test_list" in row:
        return "mbpp"
    if "inputs" in row or "input_output" in row or is_verl_row(row):
        return "stdio"
    raise BadRow("cannot tell its format: HumanEval rows have prompt/entry_point/test, MBPP rows "
                 "text/test_list, stdio rows question/inputs/outputs; set the task's format")


def _first(row: Mapping[str, Any], *names: str) -> str:
    """The first of `names` that the row has (non-empty), as text."""
    for name in names:
        if row.get(name) not in (None, ""):
            return _text(row[name], name)
    raise BadRow(f"missing field {' or '.join(repr(n) for n in names)}")


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"field {name!r} must be text, got {type(value).__name__}")
    return value


def _texts(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise BadRow(f"field {name!r} must be a non-empty list")
    return [_text(v, f"{name}[{i}]") for i, v in enumerate(value)]


def humaneval(row: Mapping[str, Any], prompt_id: str, index: int) -> Prompt:
    """A HumanEval row: the model completes `prompt`; one test, `check(entry_point)`."""
    prefix = _text(field(row, "prompt"), "prompt")
    entry_point = _text(field(row, "entry_point"), "entry_point")
    test = _text(field(row, "test"), "test")
    tests = {"kind": "asserts", "prefix": prefix, "entry_point": entry_point, "setup": "",
             "tests": [f"{test}\ncheck({entry_point})\n"]}
    return Prompt(messages=[{"role": "user", "content": HUMANEVAL.format(prompt=prefix)}], answer=tests,
                  id=str(row.get("task_id") or prompt_id), meta={"index": index, "format": "humaneval"})


def shadowed_builtins(reference: Any) -> list[str]:
    """Builtin names that a reference solution defines at its top level (MBPP's `sum`)."""
    tree = parse_quietly(reference) if isinstance(reference, str) else None
    body = tree.body if tree is not None else []
    return sorted({n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and hasattr(builtins, n.name)})


def mbpp(row: Mapping[str, Any], prompt_id: str, index: int) -> Prompt:
    """An MBPP row: each assert of `test_list` is one test."""
    text = _first(row, "text", "prompt")
    asserts = _texts(field(row, "test_list"), "test_list")
    setup = _text(row.get("test_setup_code") or "", "test_setup_code")
    setup = "\n".join([*_texts(row["test_imports"], "test_imports"), setup]) if row.get("test_imports") else setup
    tests = {"kind": "asserts", "prefix": "", "entry_point": "", "setup": setup, "tests": asserts,
             "shadowed": shadowed_builtins(row.get("code"))}
    content = MBPP.format(text=text.strip(), tests="\n".join(asserts))
    task_id = row.get("task_id")
    return Prompt(messages=[{"role": "user", "content": content}], answer=tests,
                  id=f"mbpp/{task_id}" if task_id is not None else prompt_id, meta={"index": index, "format": "mbpp"})


def _cases(spec: Any) -> list[dict[str, str]]:
    """Cases from `{"inputs": [...], "outputs": [...]}` (or its JSON text); an output given as a list of
    lines is joined."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise BadRow(f"the tests are not valid JSON: {e}") from None
    if not isinstance(spec, Mapping):
        raise BadRow("the tests must be an object with `inputs` and `outputs`")
    if spec.get("fn_name"):
        raise BadRow("call-based tests (`fn_name`) are not supported; stdio rows need input/output cases")
    inputs = _texts(spec.get("inputs"), "inputs")
    outputs = [("\n".join(_texts(o, "outputs")) if isinstance(o, list) else o) for o in spec.get("outputs") or []]
    outputs = _texts(outputs, "outputs")
    if len(inputs) != len(outputs):
        raise BadRow(f"{len(inputs)} inputs but {len(outputs)} outputs")
    return [{"input": i, "output": o} for i, o in zip(inputs, outputs)]


def stdio(row: Mapping[str, Any], prompt_id: str, index: int) -> Prompt:
    """A stdin/stdout row: each input/output pair is one test."""
    if is_verl_row(row):
        messages, _, rest = verl_fields(row)
        truth = row["reward_model"]["ground_truth"]  # the JSON text or, from parquet, the object itself
        return Prompt(messages=messages, answer={"kind": "stdio", "cases": _cases(truth)}, id=prompt_id,
                      meta={"index": index, "format": "stdio", **rest})
    question = _first(row, "question", "problem")
    spec = row["input_output"] if row.get("input_output") else {"inputs": row.get("inputs"), "outputs": row.get("outputs")}
    content = STDIO.format(question=question.strip())
    return Prompt(messages=[{"role": "user", "content": content}], answer={"kind": "stdio", "cases": _cases(spec)},
                  id=str(row.get("id") or row.get("problem_id") or prompt_id), meta={"index": index, "format": "stdio"})


CONVERTERS = {"humaneval": humaneval, "mbpp": mbpp, "stdio": stdio}


def to_prompt(row: Mapping[str, Any], fmt: str, prompt_id: str, index: int) -> Prompt:
    """One row in format `fmt` (`auto`: detected per row) as a Prompt; BadRow naming the field otherwise."""
    return CONVERTERS[detect(row) if fmt == "auto" else fmt](row, prompt_id, index)
