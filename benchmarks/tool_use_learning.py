"""Learning to use a tool, over several seeds: the examples/tool-use recipe, and its no-tool control.

For each seed: two warm starts (`rlcore warmstart`: every demonstration calling the calculator, then the
task's own mix, where 5% do), then GRPO with the calculator offered, and the same GRPO from the same model
without it (`task.calculator=false`, the no-tool control). Prints tool calls per sample and reward per step
(mean and range over seeds) and writes `curves.png` and `summary.json` to --out.

    python benchmarks/tool_use_learning.py --seeds 0 1 2 --out runs/tool-use
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "tool-use" / "cpu.yaml"


def rlcore(*args: object) -> None:
    """Run `rlcore ARGS` as a user would; stop with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", "rlcore", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"rlcore {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")


def metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_seed(seed: int, out: Path, steps: int) -> dict[str, list[float]]:
    """The recipe's three commands for one seed, plus the control; per-step curves."""
    base = out / f"seed{seed}"
    rlcore("warmstart", "--config", RECIPE, "--out", base / "ws1", "--steps", 100, "--lr", 3e-3, "--seed", seed,
           "--set", "task.demo_tool_rate=1.0")
    rlcore("warmstart", "--config", RECIPE, "--model", base / "ws1" / "model", "--out", base / "ws2", "--steps", 60,
           "--lr", 1e-3, "--seed", seed)
    model = base / "ws2" / "model"
    rlcore("run", "--config", RECIPE, "--model", model, "--run-dir", base / "tool", "--seed", seed, "--steps", steps)
    rlcore("run", "--config", RECIPE, "--model", model, "--run-dir", base / "no-tool", "--seed", seed, "--steps", steps,
           "--set", "task.calculator=false")
    tool, control = metrics(base / "tool"), metrics(base / "no-tool")
    return {"tool_calls": [r["rollout/tool_calls"] for r in tool], "reward": [r["reward/mean"] for r in tool],
            "no_tool_reward": [r["reward/mean"] for r in control]}


def draw(curves: list[dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, c in enumerate(curves):
        steps = range(1, len(c["reward"]) + 1)
        axes[0].plot(steps, c["tool_calls"], color="C0", alpha=0.7, label="with the calculator" if i == 0 else None)
        axes[1].plot(steps, c["reward"], color="C0", alpha=0.7, label="with the calculator" if i == 0 else None)
        axes[1].plot(steps, c["no_tool_reward"], color="C3", alpha=0.7, ls="--",
                     label="no-tool control" if i == 0 else None)
    axes[0].set(xlabel="step", ylabel="tool calls per sample", ylim=(-0.05, 1.05))
    axes[1].set(xlabel="step", ylabel="reward (exact product)", ylim=(-0.05, 1.05))
    axes[1].legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40, help="RL steps per run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tool-use")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    curves = [one_seed(seed, args.out, args.steps) for seed in args.seeds]
    print(f"{len(args.seeds)} seeds in {time.perf_counter() - started:.0f} s; mean [min, max] over seeds")
    print("step  tool calls/sample    reward              no-tool reward")
    for step in sorted({1, 2, 3, 5, 10, 15, 20, 30, args.steps} & set(range(1, args.steps + 1))):
        cells = []
        for key in ("tool_calls", "reward", "no_tool_reward"):
            values = [c[key][step - 1] for c in curves]
            cells.append(f"{sum(values) / len(values):.2f} [{min(values):.2f}, {max(values):.2f}]")
        print(f"{step:4d}  " + "  ".join(f"{cell:18s}" for cell in cells))
    (args.out / "summary.json").write_text(json.dumps({"seeds": args.seeds, "curves": curves}, indent=1))
    try:
        draw(curves, args.out / "curves.png")
        print(f"wrote {args.out / 'curves.png'}")
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install 'rlcore[report]')")


if __name__ == "__main__":
    main()
