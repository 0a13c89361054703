"""What measuring `mismatch/*` in the update's own forward saves: SmolLM2-135M on GSM8K prompts, one process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/mismatch_pass.py            # reads ../shared/data

Samples one GRPO batch (`--prompts` GSM8K test prompts x `--n` samples, up to `--max-new-tokens` tokens,
the hf rollout at temperature 1) with SmolLM2-135M-Instruct (its GGUF de-quantised once), then times,
alternating for `--rounds` rounds on fresh copies of the same starting weights, the two ways an on-policy
step gets its mismatch metric: `extra pass` (a no-grad `logprobs` pass before the update, what the loop
did until it measured the mismatch in the update) and `in update` (the update alone, which now reports it).
Prints the median seconds of each phase, the per-step speed-up (generation included) and the largest
difference between the two ways' metrics. Machines are shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402 - after the thread environment is set

from _shared_data import GSM8K_TEST, SMOLLM2, require  # noqa: E402
from rlcore import RolloutBatch, SamplingParams, UpdatePlan  # noqa: E402
from rlcore.metrics import finish_mismatch, logprob_mismatch  # noqa: E402
from rlcore.plugins import instantiate, load  # noqa: E402
from rlcore.testing import make_context  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM2), help="a GGUF file or a transformers model directory")
    parser.add_argument("--gsm8k", default=str(GSM8K_TEST), help="GSM8K's test split (jsonl)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = require(args.model, "SmolLM2-135M-Instruct", "--model PATH")
    data = require(args.gsm8k, "GSM8K's test split", "--gsm8k PATH")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = make_context(Path(tmp), Path(model))
        task = instantiate(load("task", "gsm8k"), {"test_path": str(data)}, "task")
        prompts = list(task.dataset(split="test"))[:args.prompts]
        rollout = instantiate(load("rollout", "hf"), {}, "rollout")
        rollout.setup(ctx=ctx)
        t0 = time.perf_counter()
        batch = rollout.sample(prompts=prompts, params=SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens,
                                                                      temperature=1.0, seed=0),
                               tools=[], interaction=None)
        generation = time.perf_counter() - t0
        batch.advantages = torch.randn(batch.response_ids.shape) * batch.response_mask
        algo = instantiate(load("algo", "grpo"), {}, "algo")
        loss = algo.policy_loss()
        backend = instantiate(load("backend", "torch"), {}, "backend")
        backend.setup(ctx=ctx)
        start = copy.deepcopy(backend.model.state_dict())
        times: dict[str, list[float]] = {"extra pass": [], "in update": [], "logprobs pass": []}
        gaps = []
        for _ in range(args.rounds):
            for way in ("extra pass", "in update"):
                backend.model.load_state_dict(start)
                part = copy.copy(batch)
                t0 = time.perf_counter()
                if way == "extra pass":
                    before = backend.logprobs(batch=part, reference=False)
                    times["logprobs pass"].append(time.perf_counter() - t0)
                    want = logprob_mismatch(before, part.rollout_logprobs, part.response_mask)
                    backend.update(batch=part, loss=loss, plan=UpdatePlan())
                else:
                    got = finish_mismatch(backend.update(batch=part, loss=loss, plan=UpdatePlan()))
                times[way].append(time.perf_counter() - t0)
            gaps.append(max(abs(got[k] - want[k]) for k in want))
    med = {way: statistics.median(values) for way, values in times.items()}
    tokens = int(batch.response_mask.sum())
    print(f"batch: {len(batch)} rows, {tokens} response tokens; generation {generation:.1f} s; "
          f"{args.rounds} rounds, medians")
    print(f"| way | logprobs + update (s) | step incl. generation (s) |\n|---|---|---|")
    for way in ("extra pass", "in update"):
        print(f"| {way} | {med[way]:.2f} | {generation + med[way]:.2f} |")
    print(f"extra no-grad pass: {med['logprobs pass']:.2f} s; update phase {med['extra pass'] / med['in update']:.2f}x, "
          f"whole step {(generation + med['extra pass']) / (generation + med['in update']):.2f}x faster in update")
    print(f"largest difference between the two ways' mismatch metrics: {max(gaps):.2e}; "
          f"abs_diff_max {want['mismatch/abs_diff_max']:.2e}, iw_std {want['mismatch/iw_std']:.2e}")


if __name__ == "__main__":
    main()
