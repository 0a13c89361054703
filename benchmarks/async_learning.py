"""Does bounded staleness hurt learning? The default recipe (`rlcore run`: GRPO, arithmetic, the embedded model,
250 steps) with `trainer.max_staleness` 0, 1 and 2, three seeds each, side by side.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/async_learning.py [--seeds 0 1 2] [--staleness 0 1 2]

Prints, per staleness and seed, the mean reward of the first and last 10 steps, then per staleness the mean
final reward and the seed-to-seed range; an asynchronous setting passes when its mean final reward lies
within the synchronous runs' range widened by their standard deviation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def final_rewards(run_dir: Path, seed: int, k: int, steps: int, extra: list[str]) -> tuple[float, float]:
    """One default run; the mean reward of its first and last 10 steps."""
    cmd = [sys.executable, "-m", "rlcore", "run", "--run-dir", str(run_dir), "--seed", str(seed), "--steps", str(steps),
           "--set", f"trainer.max_staleness={k}", "--set", "trainer.save_every=0"]
    for option in extra if k else ():
        cmd += ["--set", option]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rewards = [json.loads(line)["reward/mean"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an option for the asynchronous runs only (e.g. algo.tis_cap=2)")
    a = parser.parse_args()
    finals: dict[int, list[float]] = {}
    print("| max_staleness | seed | reward, first 10 steps | reward, last 10 steps |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k in a.staleness:
            for seed in a.seeds:
                first, last = final_rewards(Path(tmp) / f"k{k}-s{seed}", seed, k, a.steps, a.extra)
                finals.setdefault(k, []).append(last)
                print(f"| {k} | {seed} | {first:.3f} | {last:.3f} |", flush=True)
    print("\n| max_staleness | mean final reward | range over seeds |\n|---|---|---|")
    for k, values in finals.items():
        print(f"| {k} | {statistics.mean(values):.3f} | {min(values):.3f} - {max(values):.3f} |")
    if 0 in finals and len(finals[0]) > 1:
        sync = finals[0]
        low, high = min(sync) - statistics.stdev(sync), max(sync) + statistics.stdev(sync)
        for k, values in finals.items():
            if k:
                verdict = "within" if low <= statistics.mean(values) <= high else "OUTSIDE"
                print(f"max_staleness={k}: mean final {statistics.mean(values):.3f} is {verdict} the synchronous "
                      f"range widened by one standard deviation ({low:.3f} - {high:.3f})")


if __name__ == "__main__":
    main()
