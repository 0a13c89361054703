"""The hf rollout and torch backend in each precision: speed, and how far the rollout's logprobs are from the trainer's.

On SmolLM2-135M-Instruct with GSM8K test prompts (4 x 4 samples, up to 128 new tokens by default), for each
`dtype` (`float32`, `bfloat16`, `bfloat16_matched`) with the rollout and the trainer in the same one:
generate a batch, score it with the trainer (a no-grad logprob pass) and take one GRPO update from the same
starting weights. Prints the median seconds of each phase over `--rounds` alternating rounds, the speed-ups
against float32, the fp32 and bf16 matmul peaks measured first (`update_speed.matmul_peak`), and the
rollout-vs-trainer logprob gap over the response tokens (mean and max |difference|, nats per token) and the
importance weights it implies, and what `dtype: auto` chooses on this machine and why. Machines are shared
and noisy: read the ratios.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/precision.py --rounds 2
"""

from __future__ import annotations

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

from _shared_data import smollm_gsm8k_batch_args  # noqa: E402
from rlcore import PolicyLoss, Prompt, SamplingParams, UpdatePlan  # noqa: E402
from rlcore.context import RunContext  # noqa: E402
from rlcore.models import read_config  # noqa: E402
from rlcore.plugins import instantiate, load  # noqa: E402
from rlcore.testing import make_context  # noqa: E402
from rlcore_backends.common.auto_dtype import choose, config_counts  # noqa: E402
from update_speed import matmul_peak  # noqa: E402

DTYPES = ("float32", "bfloat16", "bfloat16_matched")
PHASES = ("generation", "logprobs", "update")
AUTO_PAIR = {"plugins": {"backend": "torch", "rollout": "hf"}, "backend": {"dtype": "auto"},
             "rollout": {"dtype": "auto"}}
"""The default run's pair, for which `dtype: auto` is printed."""


def main() -> None:
    args, model, data = smollm_gsm8k_batch_args(__doc__.splitlines()[0], rounds=2)
    peaks = {dtype: matmul_peak(dtype, budget_s=10)[0] / 1e12 for dtype in (torch.float32, torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}, matmul peak fp32 {peaks[torch.float32]:.3f} TFLOP/s, "
          f"bf16 {peaks[torch.bfloat16]:.3f} TFLOP/s ({peaks[torch.bfloat16] / peaks[torch.float32]:.2f}x)")
    auto = choose(AUTO_PAIR, "backend", lambda: config_counts(read_config(str(model))))
    print(f"dtype auto (the default) chooses {auto.dtype} on this machine: {auto.reason}")
    times = {dtype: {phase: [] for phase in PHASES} for dtype in DTYPES}
    gaps: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = make_context(Path(tmp), Path(model))
        task = instantiate(load("task", "gsm8k"), {"test_path": str(data)}, "task")
        prompts = list(task.dataset(split="test"))[:args.prompts]
        params = SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
        loss = instantiate(load("algo", "grpo"), {}, "algo").policy_loss()
        for _ in range(args.rounds):
            for dtype in DTYPES:
                gaps[dtype] = one_round(ctx, dtype, prompts, params, loss, times[dtype])
    med = {dtype: {phase: statistics.median(times[dtype][phase]) for phase in PHASES} for dtype in DTYPES}
    print(f"{len(prompts)} prompts x {args.n} samples, up to {args.max_new_tokens} new tokens; "
          f"{args.rounds} alternating rounds, medians")
    print("| dtype | generation (s) | trainer logprobs (s) | update (s) | sum (s) | sum vs float32 "
          "| gap mean | gap max | importance weights |\n|---|---|---|---|---|---|---|---|---|")
    base = sum(med["float32"].values())
    for dtype in DTYPES:
        total, gap = sum(med[dtype].values()), gaps[dtype]
        print(f"| {dtype} | {med[dtype]['generation']:.2f} | {med[dtype]['logprobs']:.2f} | "
              f"{med[dtype]['update']:.2f} | {total:.2f} | {base / total:.2f}x | {gap['mean']:.1e} | "
              f"{gap['max']:.1e} | {gap['iw_min']:.3f}-{gap['iw_max']:.3f} |")


def one_round(ctx: RunContext, dtype: str, prompts: list[Prompt], params: SamplingParams, loss: PolicyLoss,
              times: dict[str, list[float]]) -> dict[str, float]:
    """Generate, score and update once in `dtype`, appending each phase's seconds; the logprob gap."""
    rollout = instantiate(load("rollout", "hf"), {"dtype": dtype}, "rollout")
    rollout.setup(ctx=ctx)
    t0 = time.perf_counter()
    batch = rollout.sample(prompts=prompts, params=params, tools=[], interaction=None)
    times["generation"].append(time.perf_counter() - t0)
    del rollout
    backend = instantiate(load("backend", "torch"), {"dtype": dtype}, "backend")
    backend.setup(ctx=ctx)
    t0 = time.perf_counter()
    trainer = backend.logprobs(batch=batch, reference=False)
    times["logprobs"].append(time.perf_counter() - t0)
    part = copy.copy(batch)
    part.advantages = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(0))
    part.advantages *= batch.response_mask
    t0 = time.perf_counter()
    backend.update(batch=part, loss=loss, plan=UpdatePlan())
    times["update"].append(time.perf_counter() - t0)
    mask = batch.response_mask.bool()
    diff = (trainer - batch.rollout_logprobs)[mask]
    weights = diff.exp()
    return {"mean": diff.abs().mean().item(), "max": diff.abs().max().item(),
            "iw_min": weights.min().item(), "iw_max": weights.max().item()}


if __name__ == "__main__":
    main()
