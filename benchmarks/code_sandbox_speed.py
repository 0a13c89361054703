"""What scoring code costs: one bare sandbox run, and one response scored end to end (`Code.score` on a
HumanEval and an MBPP canonical solution: sandbox, judge and all), one at a time (max_workers=1).

With `--baseline DIR` (a directory holding `plugins/tasks` of another commit, e.g. made by
`git archive main plugins/tasks | tar -x -C /tmp/main`), the baseline and this checkout are measured
side by side, alternating in fresh processes round after round (each round's pair under the same
load), and the median of the rounds' ratios is printed: compare ratios, never absolute times, on a
shared machine.

    python benchmarks/code_sandbox_speed.py --baseline /tmp/main --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
HUMANEVAL, MBPP = DATA / "humaneval" / "HumanEval.jsonl", DATA / "mbpp" / "mbpp.jsonl"


def measure(runs: int, problems: int) -> dict[str, float]:
    """Median milliseconds of: a sandbox run of `pass`, and one response scored, per dataset."""
    from rlcore.config import build_options
    from rlcore.testing import make_batch
    from rlcore_tasks.code import Code
    from rlcore_tasks.sandbox import BwrapSandbox, Limits

    sandbox = BwrapSandbox(Limits())
    sandbox.run("pass")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sandbox.run("pass")
        times.append(time.perf_counter() - start)
    result = {"sandbox run": statistics.median(times) * 1000}
    for name, path, key in (("HumanEval response", HUMANEVAL, "canonical_solution"), ("MBPP response", MBPP, "code")):
        rows = [json.loads(line) for line in path.read_text().splitlines()[:problems]]
        task = Code(build_options(Code.Options, {"test_path": str(path), "max_workers": 1}, "task"))
        prompts = list(task.dataset("test"))[:problems]
        times = []
        for prompt, row in zip(prompts, rows):
            batch = make_batch(groups=1, n=1)
            batch.prompts, batch.texts = [prompt], [row[key]]
            start = time.perf_counter()
            reward = task.score(batch).rewards.item()
            times.append(time.perf_counter() - start)
            assert reward == 1.0, (prompt.id, reward)
        task.teardown()
        result[name] = statistics.median(times) * 1000
    return result


def worker(tasks_dir: str, runs: int, problems: int) -> None:
    """Measure with the rlcore_tasks found in `tasks_dir` (first on sys.path) and print JSON."""
    sys.path.insert(0, tasks_dir)
    import rlcore_tasks

    assert Path(rlcore_tasks.__file__).resolve().is_relative_to(Path(tasks_dir).resolve()), rlcore_tasks.__file__
    print(json.dumps(measure(runs, problems)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="a directory holding plugins/tasks of the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20, help="bare sandbox runs per round")
    parser.add_argument("--problems", type=int, default=20, help="responses scored per dataset and round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.runs, args.problems)
    checkouts = {"this checkout": ROOT / "plugins" / "tasks"}
    if args.baseline:
        checkouts = {"baseline": args.baseline / "plugins" / "tasks", **checkouts}
    seen: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, tasks_dir in checkouts.items():
            out = subprocess.run([sys.executable, __file__, "--worker", str(tasks_dir), "--runs", str(args.runs),
                                  "--problems", str(args.problems)], capture_output=True, text=True, check=True)
            seen[name].append(json.loads(out.stdout.splitlines()[-1]))
    names = list(checkouts)
    print(f"median ms over {args.rounds} rounds (max_workers=1; {args.runs} runs, {args.problems} responses per round)")
    print(f"{'':20}" + "".join(f"{n:>16}" for n in names) + ("   ratio (median of the rounds' ratios)"
                                                             if len(names) == 2 else ""))
    for item in seen[names[0]][0]:
        values = [statistics.median(r[item] for r in seen[n]) for n in names]
        ratios = [b[item] / a[item] for a, b in zip(*seen.values())] if len(names) == 2 else []
        ratio = f"   {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else ""
        print(f"{item:20}" + "".join(f"{v:16.1f}" for v in values) + ratio)


if __name__ == "__main__":
    main()
