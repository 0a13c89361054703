"""rlcore against TRL's GRPOTrainer (trl 1.16) on identical GRPO work, alternating in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/trl_compare.py --model 50m
    python benchmarks/trl_compare.py --model 5m --rounds 1 --steps 1        # a quick check

Same model (a seeded random Qwen2 of ~5M or ~50M parameters with the real Qwen2.5/Qwen3 151k-token BPE
tokenizer, or SmolLM2-135M-Instruct de-quantised from its GGUF), same prompts (the arithmetic task's
instruct prompts, or with `--task gsm8k` GSM8K's, in the order rlcore's loop draws them), same reward, group size, a fixed completion length
(min_new_tokens = max_new_tokens on both sides), learning rate, dtype, no KL (TRL `beta=0.0`), no
reference model, one optimizer step per generation batch and the same prompts per step.

Each run of a side is its own process (so peak RSS is measured separately, from `wait4`'s rusage of that
child); the sides alternate within the run (rlcore, TRL, rlcore, TRL, ...), each run does `--warmup`
untimed steps then `--steps` timed ones. rlcore's phases come from its `metrics.jsonl` (`timing/sample`,
`timing/logprobs`, `timing/update`); TRL's from wrapping `GRPOTrainer._generate` (generation),
`_calculate_rewards` (scoring), `_get_per_token_logps_and_entropies` without grad (old-policy logprobs),
`_prepare_inputs` and `training_step` (the update is the step's wall time minus `_prepare_inputs`: forward,
backward, clipping, optimizer step). The machine is shared and noisy: read the ratios and medians.

TRL runs in the interpreter given by `--trl-python` (default: $RLCORE_TRL_PYTHON, this interpreter if it
imports trl, else `.venv-trl/bin/python` in the repository), rlcore in this interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _trl_common as common  # noqa: E402
from _shared_data import GSM8K_TEST, SMOLLM2, require  # noqa: E402

HERE = Path(__file__).resolve()
PHASES = (("generation", "sample"), ("scoring", "score"), ("logprob", "logprob"), ("update", "update"))


def trl_python(explicit: str | None = None) -> str | None:
    """An interpreter that imports trl: `explicit`, $RLCORE_TRL_PYTHON, this one, or the repo's .venv-trl."""
    candidates = [explicit, os.environ.get("RLCORE_TRL_PYTHON"), sys.executable,
                  str(common.REPO / ".venv-trl" / "bin" / "python")]
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", "import trl, rlcore, rlcore_backends, rlcore_tasks"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return python
        if python == explicit:
            raise SystemExit(f"--trl-python {python}: cannot import trl and rlcore:\n{probe.stderr[-2000:]}")
    return None


def run_worker(python: str, kind: str, spec: dict[str, Any], log_dir: Path, label: str,
               timeout: float) -> dict[str, Any]:
    """Run one worker process; its JSON result plus `ru_maxrss_mib` (wait4 rusage of that child only)."""
    out = log_dir / f"{label}.json"
    log = log_dir / f"{label}.log"
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen([python, str(HERE), "--worker", kind, "--spec", json.dumps(spec), "--out", str(out)],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=str(common.REPO))
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{label} worker failed (exit {proc.returncode}, log {log}):\n{tail}")
    result = json.loads(out.read_text())
    result["ru_maxrss_mib"] = usage.ru_maxrss / 1024
    result["process_s"] = time.perf_counter() - start
    return result


# ---- the report ------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def side_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [s for r in runs for s in r["steps"]]
    out: dict[str, Any] = {
        "wall": med([s["wall"] for s in steps]),
        "steps_per_s": 1 / med([s["wall"] for s in steps]),
        "gen_tokens_per_s": med([s["gen_tokens"] / s["wall"] for s in steps]),
        "gen_tokens": med([s["gen_tokens"] for s in steps]),
        "update_tokens": med([s["update_tokens"] for s in steps]),
        "response_length_mean": med([s["response_length_mean"] for s in steps]),
        "rss_peak_mib": med([r["ru_maxrss_mib"] for r in runs]),
        "rss_setup_mib": med([r["rss_setup_mib"] for r in runs]),
        "round_walls": [med([s["wall"] for s in r["steps"]]) for r in runs],
        "round_updates": [med([s["update"] for s in r["steps"]]) for r in runs],
        "timed_steps": len(steps),
        # per step, so that it is the step's own remainder (medians of parts do not add up)
        "other": med([s["wall"] - sum(s.get(k, 0.0) for _, k in PHASES) for s in steps]),
    }
    for _, key in PHASES:
        out[key] = med([s.get(key, 0.0) for s in steps])
    out["rollout_tokens_per_s"] = med([s["gen_tokens"] / s["sample"] for s in steps if s["sample"] > 0])
    out["update_tokens_per_s"] = med([s["update_tokens"] / s["update"] for s in steps if s["update"] > 0])
    return out


def fmt(value: float, digits: int = 3) -> str:
    if value != value:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def report(args: argparse.Namespace, model: dict[str, Any], peaks: list[dict[str, Any]], rl: dict[str, Any],
           tr: dict[str, Any], rl_runs: list[dict[str, Any]], tr_runs: list[dict[str, Any]]) -> tuple[str, dict]:
    """The printed report and the results dict. `peaks` holds one matmul peak per round (measured just before
    that round's pair), so each round's update utilisation is taken against the machine as it was then."""
    peak = {name: med([p[name] for p in peaks]) for name in ("fp32", "bf16")}
    last = peaks[-1]
    lines = []
    add = lines.append
    params = model["params"]
    add(f"== rlcore vs TRL GRPOTrainer: model {args.model} ==")
    add(f"model: {model['model_type']} {params / 1e6:.1f}M params ({model['non_embedding_params'] / 1e6:.2f}M "
        f"non-embedding; vocab {model['vocab']}, hidden {model['hidden']}, {model['layers']} layers, "
        f"tied embeddings: {model['tied']}) at {model['dir']}")
    prompt_tokens = (rl["update_tokens"] - rl["gen_tokens"]) / (args.prompts * args.group)
    add(f"workload: {args.task}, {args.prompts} prompts x {args.group} completions x {args.tokens} tokens (fixed length), "
        f"~{prompt_tokens:.0f} prompt tokens each, lr {args.lr:g}, rlcore {args.rlcore_dtype or args.dtype}, "
        f"TRL {args.dtype}, no KL (beta 0), no reference model, 1 optimizer step per generation batch")
    add(f"precision: rlcore {'at' if args.rlcore_dtype == 'auto' else 'not at'} its default (dtype auto), TRL "
        f"{'at' if args.dtype == 'bfloat16' else 'not at'} its default (GRPOConfig bf16=True, autocast)")
    add(f"schedule: {args.rounds} rounds, each rlcore then TRL, every run {args.warmup} warm-up + {args.steps} timed "
        f"steps in its own process (rlcore {rl['timed_steps']}, TRL {tr['timed_steps']} timed steps)")
    rv, tv = rl_runs[0]["versions"], tr_runs[0]["versions"]
    add(f"rlcore side: torch {rv['torch']}, transformers {rv['transformers']}, {rv['threads']} threads, "
        f"{rv['cpu_capability']}; update dtype {rl_runs[0]['dtype']}, micro_batch_tokens "
        f"{rl_runs[0]['micro_batch_tokens']}, rollout {rl_runs[0]['rollout']}, log_mismatch "
        f"{rl_runs[0].get('log_mismatch')} (measured in the update's own forward, no extra pass)")
    add(f"TRL side: trl {tv.get('trl', '?')}, torch {tv['torch']}, transformers {tv['transformers']}, "
        f"{tv['threads']} threads; dtype {tr_runs[0]['dtype']}, optim {tr_runs[0]['optim'].split('.')[-1].lower()}, "
        f"gradient_checkpointing {tr_runs[0]['gradient_checkpointing']}")
    add(f"matmul peak (measured here before each round, {rv['threads']} threads, best of mm / linear; median of "
        f"{len(peaks)}): fp32 {peak['fp32'] / 1e12:.3f} TFLOP/s ({last['fp32_size']}x{last['fp32_size']}, "
        f"{last['fp32_op']}; rounds " + ", ".join(f"{p['fp32'] / 1e12:.3f}" for p in peaks) + f"), bf16 "
        f"{peak['bf16'] / 1e12:.3f} TFLOP/s ({last['bf16_size']}x{last['bf16_size']}, {last['bf16_op']}; rounds "
        + ", ".join(f"{p['bf16'] / 1e12:.3f}" for p in peaks) + f"); bf16/fp32 = {peak['bf16'] / peak['fp32']:.2f}")
    add("  1024x1024 probe GFLOP/s: fp32 " + ", ".join(f"{k} {v:.1f}" for k, v in last["fp32_probe_gflops"].items())
        + "; bf16 " + ", ".join(f"{k} {v:.1f}" for k, v in last["bf16_probe_gflops"].items())
        + (f" (bf16 timed at {last['bf16_size']}: 4096 would exceed --peak-budget)"
           if last["bf16_size"] < 4096 else ""))
    add(f"generated tokens per step: rlcore {rl['gen_tokens']:.0f}, TRL {tr['gen_tokens']:.0f} "
        f"(target {args.prompts * args.group * args.tokens}); mean completion length rlcore "
        f"{rl['response_length_mean']:.1f}, TRL {tr['response_length_mean']:.1f}")
    add("")
    add(f"{'metric (median over timed steps)':<40}{'rlcore':>12}{'TRL':>12}{'rlcore/TRL':>12}")

    def row(name: str, a: float, b: float, ratio: float) -> None:
        add(f"{name:<40}{fmt(a):>12}{fmt(b):>12}{fmt(ratio):>12}")

    row("steps/s", rl["steps_per_s"], tr["steps_per_s"], rl["steps_per_s"] / tr["steps_per_s"])
    row("generated tokens/s (end to end)", rl["gen_tokens_per_s"], tr["gen_tokens_per_s"],
        rl["gen_tokens_per_s"] / tr["gen_tokens_per_s"])
    row("step seconds", rl["wall"], tr["wall"], rl["wall"] / tr["wall"])
    for name, key in PHASES:
        a, b = rl[key], tr[key]
        row(f"phase {name} s/step (speed-up TRL/rlcore)", a, b, b / a if min(a, b) > 1e-3 else float("nan"))
    row("generation tokens/s", rl["rollout_tokens_per_s"], tr["rollout_tokens_per_s"],
        rl["rollout_tokens_per_s"] / tr["rollout_tokens_per_s"])
    row("update tokens/s (prompt+completion)", rl["update_tokens_per_s"], tr["update_tokens_per_s"],
        rl["update_tokens_per_s"] / tr["update_tokens_per_s"])
    row("other s/step (rest of the step)", rl["other"], tr["other"], float("nan"))
    row("peak RSS MiB (wait4 ru_maxrss)", rl["rss_peak_mib"], tr["rss_peak_mib"],
        rl["rss_peak_mib"] / tr["rss_peak_mib"])
    row("RSS after setup MiB", rl["rss_setup_mib"], tr["rss_setup_mib"], rl["rss_setup_mib"] / tr["rss_setup_mib"])
    trl_detail = {k: med([s.get(k, 0.0) for r in tr_runs for s in r["steps"]])
                  for k in ("fwd_bwd", "forward", "optim_and_rest", "prepare_other")}
    add(f"TRL update split: forward {fmt(trl_detail['forward'])} s (in compute_loss), forward+backward "
        f"{fmt(trl_detail['fwd_bwd'])} s, clip+optimizer+callbacks {fmt(trl_detail['optim_and_rest'])} s; "
        f"rest of _prepare_inputs {fmt(trl_detail['prepare_other'])} s")
    paired = [t / r for r, t in zip(rl["round_walls"], tr["round_walls"])]
    add("per-round throughput ratio rlcore/TRL (paired rounds): "
        + ", ".join(fmt(x) for x in paired) + f"; median {fmt(med(paired))}")
    add("")
    # FLOP utilisation of the update phase.
    results: dict[str, Any] = {"paired_ratios": paired}
    for side, s, dtype in (("rlcore", rl, rl_runs[0]["dtype"]), ("TRL", tr, tr_runs[0]["dtype"])):
        flops = 6 * params * s["update_tokens"]
        useful = (6 * model["non_embedding_params"] * s["update_tokens"]
                  + 6 * model["vocab"] * model["hidden"] * s["gen_tokens"])
        util = {name: med([flops / u / p[name] for u, p in zip(s["round_updates"], peaks) if u > 0])
                for name in ("fp32", "bf16")}
        useful_fp32 = med([useful / u / p["fp32"] for u, p in zip(s["round_updates"], peaks) if u > 0])
        add(f"update FLOP utilisation {side}: 6 x {params / 1e6:.1f}M params x {s['update_tokens']:.0f} tokens = "
            f"{flops / 1e9:.1f} GFLOP per update, {fmt(s['update'])} s = {flops / s['update'] / 1e12:.3f} TFLOP/s; "
            f"{100 * util['fp32']:.1f}% of fp32 peak, {100 * util['bf16']:.1f}% of bf16 peak (median over rounds of "
            f"each round's update / its peak; update dtype {dtype})")
        add(f"    model FLOPs without the embedding lookup, LM head on completion tokens only: {useful / 1e9:.1f} "
            f"GFLOP per update = {100 * useful_fp32:.1f}% of fp32 peak")
        runs = rl_runs if side == "rlcore" else tr_runs
        if runs[0].get("share_prompts"):  # each distinct prompt runs once, not once per sample
            computed = useful - 6 * model["non_embedding_params"] * (s["update_tokens"] - s["gen_tokens"]) * (
                1 - 1 / args.group)
            computed_fp32 = med([computed / u / p["fp32"] for u, p in zip(s["round_updates"], peaks) if u > 0])
            add(f"    the same, each distinct prompt once as share_prompts runs it: {computed / 1e9:.1f} GFLOP per "
                f"update = {100 * computed_fp32:.1f}% of fp32 peak")
        results[f"{side}_update_util_bf16"] = util["bf16"]
        results[f"{side}_update_util_fp32"] = util["fp32"]
        # generation: 2 FLOPs per weight of the decoder layers and of the LM head per generated token
        per_token = 2 * model["non_embedding_params"] + 2 * model["vocab"] * model["hidden"]
        rate = per_token * s["gen_tokens"] / s["sample"] if s["sample"] > 0 else float("nan")
        used = "bf16" if dtype.startswith("bfloat16") else "fp32"  # bfloat16_matched: bf16 matmuls
        add(f"    generation: {per_token / 1e6:.0f} MFLOP per token x {s['gen_tokens']:.0f} tokens in {fmt(s['sample'])} s "
            f"= {rate / 1e12:.4f} TFLOP/s, {100 * rate / peak[used]:.1f}% of the {used} peak (attention not counted)")
        results[f"{side}_generation_util"] = rate / peak[used]
    add("")
    ratio = rl["gen_tokens_per_s"] / tr["gen_tokens_per_s"]
    util = results["rlcore_update_util_bf16"]
    rss_ratio = rl["rss_peak_mib"] / tr["rss_peak_mib"]
    on_50m = args.model == "50m"

    def target(name: str, ok: bool, measured: str, applies: bool = True, scope: str = "the 50m model") -> None:
        verdict = ("PASS" if ok else "FAIL") if applies else "N/A"
        note = "" if applies else f" (target defined on {scope})"
        add(f"TARGET {name}: {verdict} (measured {measured}){note}")

    target("end-to-end throughput >= 3x TRL, hf rollout, 50M", ratio >= 3.0, f"{ratio:.2f}x",
           on_50m and args.rollout == "hf", "the 50m model with the hf rollout")
    if args.rollout != "hf":
        add(f"end-to-end throughput with --rollout {args.rollout}: {ratio:.2f}x TRL (the issue asks for more than "
            "the hf rollout's ratio)")
    target("update >= 40% of measured bf16 matmul peak, 50M", util >= 0.40,
           f"{100 * util:.1f}% of bf16 peak, {100 * results['rlcore_update_util_fp32']:.1f}% of fp32 peak, "
           f"rlcore dtype {rl_runs[0]['dtype']}", on_50m)
    if peak["bf16"] < peak["fp32"]:
        # On this CPU bf16 is the slower dtype, so the bf16 reading of the target is met trivially; the same bar
        # against the faster dtype's peak is the meaningful one.
        fast = results["rlcore_update_util_fp32"]
        target("update >= 40% of the faster dtype's peak (fp32 here: bf16 is slower on this CPU), 50M",
               fast >= 0.40, f"{100 * fast:.1f}% of fp32 peak", on_50m)
    target("peak RSS <= TRL's", rss_ratio <= 1.0,
           f"rlcore {rl['rss_peak_mib']:.0f} MiB vs TRL {tr['rss_peak_mib']:.0f} MiB, {rss_ratio:.2f}x")
    results.update({"model": model, "peak": peak, "peaks": peaks, "rlcore": rl, "trl": tr, "throughput_ratio": ratio,
                    "rss_ratio": rss_ratio})
    return "\n".join(lines), results


# ---- the driver ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("5m", "50m", "smollm"), default="50m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rlcore/TRL alternations (default 3)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (default 4)")
    parser.add_argument("--tokens", type=int, default=32, help="completion length, fixed (default 32)")
    parser.add_argument("--task", choices=("arithmetic", "gsm8k"), default="arithmetic",
                        help="where the prompts come from: the arithmetic task's instruct prompts, or GSM8K's train "
                             "split (real prompts of ~100-250 tokens; reads --gsm8k-dir)")
    parser.add_argument("--gsm8k-dir", default=str(GSM8K_TEST.parent), help="GSM8K's train.jsonl and test.jsonl")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rollout", choices=("hf", "vllm"), default="hf",
                        help="rlcore's rollout engine (vllm: run this script with an interpreter that has "
                             "rlcore-backends[vllm]; TRL still generates with transformers)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of both sides (rlcore backend.dtype; TRL bf16); TRL's default is bfloat16 "
                             "(GRPOConfig's bf16=True), rlcore's is --rlcore-dtype auto")
    parser.add_argument("--rlcore-dtype", choices=("auto", "float32", "bfloat16", "bfloat16_matched"), default=None,
                        help="rlcore's dtype (backend and hf rollout) where it differs from TRL's --dtype; auto: "
                             "rlcore's default, the measured choice")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "rlcore_trl_compare"),
                        help="models (reused across runs), run directories and worker logs")
    parser.add_argument("--trl-python", default=None, help="interpreter with trl 1.16 and rlcore installed")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    parser.add_argument("--peak-budget", type=float, default=40.0,
                        help="seconds one dtype's matmul peak may take; the size shrinks from 4096 to fit (default 40)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return common.worker_main(args.worker, args.spec, args.out)
    for name in ("steps", "rounds", "prompts", "group", "tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    trl_py = trl_python(args.trl_python)
    if trl_py is None:
        print("trl is not importable here nor in .venv-trl (see --trl-python); nothing to compare", file=sys.stderr)
        return 2
    gsm8k = None
    if args.task == "gsm8k":
        directory = require(args.gsm8k_dir, "GSM8K (train.jsonl and test.jsonl)", "--gsm8k-dir DIR")
        gsm8k = {"train": str(directory / "train.jsonl"), "test": str(directory / "test.jsonl")}
    if args.model == "smollm":
        require(SMOLLM2, "SmolLM2-135M-Instruct (GGUF), the model of --model smollm", "--model 5m or 50m")
    work = Path(args.work_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {"model": args.model, "model_dir": str(work / f"model-{args.model}"), "work_dir": str(work),
                            "steps": args.steps, "warmup": args.warmup, "prompts": args.prompts,
                            "group": args.group, "tokens": args.tokens, "lr": args.lr, "seed": args.seed,
                            "dtype": args.dtype, "rlcore_dtype": args.rlcore_dtype, "rollout": args.rollout,
                            "task": args.task, "gsm8k": gsm8k,
                            "peak_budget": args.peak_budget}
    print(f"preparing model {args.model} ...", flush=True)
    model = run_worker(sys.executable, "prepare", spec, logs, "prepare", args.timeout)["model"]
    rl_runs, tr_runs, peaks = [], [], []
    for r in range(args.rounds):
        # The machine is shared: measure the peak right before each round's pair, in its own process.
        peaks.append(run_worker(sys.executable, "peak", spec, logs, f"peak-round{r + 1}", args.timeout)["peak"])
        print(f"round {r + 1} peak  : fp32 {peaks[-1]['fp32'] / 1e12:.3f} TFLOP/s, bf16 "
              f"{peaks[-1]['bf16'] / 1e12:.3f} TFLOP/s", flush=True)
        for side, python, runs in (("rlcore", sys.executable, rl_runs), ("trl", trl_py, tr_runs)):
            result = run_worker(python, side, spec, logs, f"{side}-round{r + 1}", args.timeout)
            runs.append(result)
            walls = [s["wall"] for s in result["steps"]]
            print(f"round {r + 1} {side:<6}: {len(walls)} steps, median {med(walls):.2f} s/step, peak RSS "
                  f"{result['ru_maxrss_mib']:.0f} MiB, process {result['process_s']:.0f} s", flush=True)
    print()
    text, results = report(args, model, peaks, side_summary(rl_runs), side_summary(tr_runs), rl_runs, tr_runs)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                        if k not in ("worker", "spec", "out")},
                                               "rlcore_runs": rl_runs, "trl_runs": tr_runs, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
