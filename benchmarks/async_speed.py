"""Steps per second of asynchronous RL (`trainer.max_staleness=1`) against the synchronous loop (`0`), on the
same placement and work, measured side by side in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/async_speed.py                 # random models, ~10 minutes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/async_speed.py --smollm2       # adds SmolLM2-135M (../shared/data)
    python benchmarks/async_speed.py --gpu --steps 12 --warmup 3             # one CUDA GPU (not executed yet)

Each case runs the real `rlcore run` twice per round (k=0, then k=1; `--rounds` alternating rounds) on Ray's
disaggregated placement with two CPU devices: the trainer on one core, the rollout worker on the other
(Ray gives each actor one OpenMP thread). A step's time is the loop's `timing/step` (sampling, scoring and
training for k=0; waiting for the batch and training for k=1), summed over the steps after `--warmup`, so Ray's
start-up and the first compilations do not count. The speed-up is time(k=0) / time(k=1) per round; the
rollout : train ratio r is the synchronous run's sampling time over the rest of its step; the ideal
speed-up is (1 + r) / max(1, r): 2x with equal halves, less the further r is from 1.

Cases: the embedded default (tiny: its steps are dominated by Ray's per-call overhead), a random Qwen2 of
3.4M parameters (hidden 256, 4 layers) from many short rows (training-heavy: the update grows with the rows,
batched decoding much less) to few long ones (rollout-heavy: decoding goes token by token), and SmolLM2-135M
on the shipped GSM8K prompts where its weights are present. Machines are shared and noisy:
read the ratios, not the absolute figures.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared_data import REPO, SMOLLM2, require  # noqa: E402

COMMON = ["--set", "trainer.save_every=0", "--set", "trainer.log_mismatch=false"]
RAY = ["--set", "plugins.placement=ray", "--set", "placement.mode=disaggregated", "--set", "placement.devices_per_node=2"]
ONE_GPU = ["--hardware", "cuda", "--set", "plugins.placement=local"]
"""`--gpu`: one GPU, so the rollout thread and the trainer share it in one process (not executed here yet)."""


def gpu_cases(work: Path) -> list[tuple[str, list[str]]]:
    """A random Qwen2 of Qwen2.5-0.5B's depth and width (hidden 896, 24 layers, 14 heads of 64; the character
    vocabulary, so ~0.3B parameters) built on the spot, in bf16 on both sides, short to long responses."""
    from rlcore.models import build_tiny_model

    model = build_tiny_model(work / "gpu-model", hidden=896, layers=24, heads=14)
    args = ["--model", model, "--set", "backend.lr=1e-5", "--set", "backend.dtype=bfloat16",
            "--set", "rollout.dtype=bfloat16", "--set", "task.max_operand=4"]
    return [(f"random 0.5B-shaped Qwen2 (cuda, bf16), {p}x{n} rows, {t} tokens", [
        *args, "--set", f"trainer.prompts_per_step={p}", "--set", f"sampling.n={n}",
        "--set", f"sampling.max_new_tokens={t}", "--set", f"sampling.min_new_tokens={t}"])
        for p, n, t in ((32, 8, 128), (16, 8, 256), (8, 4, 512))]


def cases(work: Path, smollm2: bool) -> list[tuple[str, list[str]]]:
    """(name, `rlcore run` arguments) for each shape of work."""
    from rlcore.models import build_tiny_model

    mid = build_tiny_model(work / "mid-model", hidden=256, layers=4, heads=4)
    mid_args = ["--model", mid, "--set", "backend.lr=1e-3", "--set", "task.max_operand=4"]
    out = [("embedded default (134K params), 32x8 rows, 4 tokens", [])]
    for prompts, n, tokens in ((16, 8, 24), (8, 4, 48), (4, 4, 64), (2, 4, 128)):
        out.append((f"random 3.4M params, {prompts}x{n} rows, {tokens} tokens", [
            *mid_args, "--set", f"trainer.prompts_per_step={prompts}", "--set", f"sampling.n={n}",
            "--set", f"sampling.max_new_tokens={tokens}", "--set", f"sampling.min_new_tokens={tokens}"]))
    if smollm2:
        model = require(SMOLLM2, "SmolLM2-135M-Instruct", "--smollm2 only where ../shared/data holds it")
        out.append(("SmolLM2-135M, GSM8K, 4x4 rows, 64 tokens", [
            "--model", model, "--task", "gsm8k", "--set", f"task.path={REPO / 'examples' / 'data' / 'gsm8k'}", "--set", "backend.lr=1e-6",
            "--set", "trainer.prompts_per_step=4", "--set", "sampling.n=4", "--set", "sampling.max_new_tokens=64"]))
    return out


def timed_run(run_dir: Path, args: list[str], steps: int, k: int, warmup: int) -> dict[str, float]:
    """One `rlcore run`; the seconds of its steps after the warm-up, and the synchronous split of a step."""
    cmd = [sys.executable, "-m", "rlcore", "run", "--run-dir", str(run_dir), "--steps", str(steps), *COMMON,
           "--set", f"trainer.max_staleness={k}", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    step = sum(r["timing/step"] for r in rows)
    sample = sum(r.get("timing/sample", 0.0) + r.get("timing/score", 0.0) for r in rows)
    return {"seconds": step, "steps": len(rows), "sample": sample,
            "trainer_wait": sum(r.get("async/trainer_wait_s", 0.0) for r in rows),
            "rollout_wait": sum(r.get("async/rollout_wait_s", 0.0) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (reads ../shared/data)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--gpu", action="store_true",
                        help="instead: one CUDA GPU shared by both sides in one process, a 0.5B-shaped random model")
    a = parser.parse_args()
    placement = "one CUDA GPU, local placement" if a.gpu else "Ray disaggregated, trainer and rollout one core each"
    print(f"cores: {os.cpu_count()}; placement: {placement}; {a.steps} steps ({a.warmup} warm-up), "
          f"{a.rounds} alternating rounds")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        table = []
        for name, args in gpu_cases(work) if a.gpu else cases(work, a.smollm2):
            if a.only not in name:
                continue
            args = [*(ONE_GPU if a.gpu else RAY), *args]
            speedups, ratios, per_step = [], [], {0: [], 1: []}
            for r in range(a.rounds):
                result = {k: timed_run(work / f"{len(table)}-{r}-{k}", args, a.steps, k, a.warmup) for k in (0, 1)}
                sync = result[0]
                speedups.append(sync["seconds"] / result[1]["seconds"])
                ratios.append(sync["sample"] / max(sync["seconds"] - sync["sample"], 1e-9))
                for k in (0, 1):
                    per_step[k].append(result[k]["seconds"] / result[k]["steps"])
                print(f"  {name}, round {r + 1}: k=0 {per_step[0][-1]:.3f} s/step, k=1 {per_step[1][-1]:.3f} s/step "
                      f"(trainer waited {result[1]['trainer_wait']:.2f} s, rollout {result[1]['rollout_wait']:.2f} s): "
                      f"{speedups[-1]:.2f}x", flush=True)
            table.append((name, statistics.median(ratios), statistics.median(per_step[0]),
                          statistics.median(per_step[1]), speedups))
    print("\n| work | rollout : train (k=0) | s/step k=0 | s/step k=1 | speed-up k=1 / k=0 (rounds) | ideal |")
    print("|---|---|---|---|---|---|")
    for name, ratio, s0, s1, speedups in table:
        rounds = ", ".join(f"{s:.2f}" for s in speedups)
        ideal = (1 + ratio) / max(1.0, ratio)  # (rollout + train) / the longer of the two
        print(f"| {name} | {ratio:.2f} | {s0:.3f} | {s1:.3f} | **{statistics.median(speedups):.2f}x** ({rounds}) "
              f"| {ideal:.2f}x |")


if __name__ == "__main__":
    main()
