"""Work an on-policy step no longer does, timed both ways in one process: SmolLM2-135M on GSM8K prompts.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/wasted_work.py            # reads ../shared/data

Samples GRPO batches (`--prompts` GSM8K test prompts x `--n` samples, up to `--max-new-tokens` tokens,
the hf rollout at temperature 1, seeded) with SmolLM2-135M-Instruct (its GGUF de-quantised once), timing,
alternating for `--rounds` rounds (the update on fresh copies of the same starting weights):

- how an on-policy step gets its `mismatch/*` metric: `extra pass` (a no-grad `logprobs` pass before the
  update, what the loop did until the update measured it) against `in update` (the update alone);
- how the hf rollout's decode loop keeps its KV cache, both through transformers' forward: `concatenating`
  (transformers' `DynamicLayer`, a copy of the whole cache every step, what it did first) against
  `transformers step` (written in place, `ReservedLayer`);
- how a decode step runs the decoder's `Linear` layers: `x @ W.T` (`Linear`'s own GEMM, what it did first),
  `W @ x.T` (what it did next) and `packed` (oneDNN over weights reordered per decode, the LM head too)
  against the way `linears.decode_linears` measures fastest on this machine (what it does now);
- how a decode step runs a Llama-family decoder: `transformers step` (its forward, what it did before)
  against `written out` (`step.DecodeStep`, q/k/v and gate/up one GEMM each where packed, over a cache that
  holds each distinct prompt once, `shared_cache.SharedPromptCache`);
- how the update cuts the batch into micro-batches: `consecutive` rows as sampled (one padded block at the
  default budget, what the backends did before) against `by length` (rows sorted by length and cut where
  padding costs more than a pass, `micro_batches.by_length`, what they do now);
- how the update runs a group's shared prompt: `whole rows` (every row's prompt through the model, what it
  did before) against `in update` (each distinct prompt once, the responses on its cached keys and values,
  `backend.share_prompts`, what it does now).

Prints the median seconds, the per-step speed-ups (generation included), the padded tokens of each cut and
the largest difference between the ways' metrics (the gradient norm: on-policy, the loss's value does not
depend on the logprobs). Machines are shared and noisy: read the ratios.
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
from rlcore import RolloutBatch, SamplingParams, UpdatePlan  # noqa: E402
from rlcore.metrics import finish_mismatch, logprob_mismatch  # noqa: E402
from rlcore.plugins import instantiate, load  # noqa: E402
from rlcore.testing import make_context  # noqa: E402
from rlcore_backends.common import micro_batches  # noqa: E402
from rlcore_backends.rollout.hf import decode, linears  # noqa: E402
from rlcore_backends.rollout.hf import step as decode_step  # noqa: E402


def main() -> None:
    args, model, data = smollm_gsm8k_batch_args(__doc__.splitlines()[0], rounds=3)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = make_context(Path(tmp), Path(model))
        task = instantiate(load("task", "gsm8k"), {"test_path": str(data)}, "task")
        prompts = list(task.dataset(split="test"))[:args.prompts]
        rollout = instantiate(load("rollout", "hf"), {}, "rollout")
        rollout.setup(ctx=ctx)
        params = SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
        reserve, choose, supported = decode.reserve, linears.choose, decode_step.supported
        forced = {"x @ W.T": ("linear", "skinny"), "W @ x.T": ("skinny", "skinny"), "packed": ("packed", "packed")}
        generation_ways = ["concatenating", *forced, "transformers step", "written out"]
        decoded: dict[str, list[float]] = {way: [] for way in generation_ways}
        # the GEMM ways are probed once per process: here, so that no timed way pays for it
        chosen = linears.ways(rollout.model, rollout.model.get_output_embeddings(), args.max_new_tokens)[1:]
        samples = {}
        for _ in range(args.rounds):
            for way in generation_ways:
                decode.reserve = (lambda cache, room: None) if way == "concatenating" else reserve
                decode_step.supported = ((lambda decoder: False) if way in ("concatenating", "transformers step")
                                         else supported)
                body, lm_head = forced.get(way, (None, None))
                linears.choose = choose if body is None else (
                    lambda layers, steps, head=False, packable=True, body=body, lm_head=lm_head:
                    lm_head if head else body)
                t0 = time.perf_counter()
                samples[way] = rollout.sample(prompts=prompts, params=params, tools=[], interaction=None)
                decoded[way].append(time.perf_counter() - t0)
        decode.reserve, linears.choose, decode_step.supported = reserve, choose, supported
        batch = samples["written out"]
        same_tokens = {way: torch.equal(batch.response_ids, samples[way].response_ids) for way in generation_ways}
        old_generation = statistics.median(decoded["concatenating"])
        transformers_generation = statistics.median(decoded["transformers step"])
        same_cache_tokens = torch.equal(samples["concatenating"].response_ids, samples["transformers step"].response_ids)
        generation = statistics.median(decoded["written out"])
        gemm_generation = {way: statistics.median(decoded[way]) for way in forced}
        batch.advantages = torch.randn(batch.response_ids.shape) * batch.response_mask
        algo = instantiate(load("algo", "grpo"), {}, "algo")
        loss = algo.policy_loss()
        backend = instantiate(load("backend", "torch"), {}, "backend")
        backend.setup(ctx=ctx)
        start = copy.deepcopy(backend.model.state_dict())
        by_length = micro_batches.by_length

        def consecutive(rows: RolloutBatch, budget: int, pass_cost: int) -> tuple[torch.Tensor, list]:
            return torch.arange(len(rows)), micro_batches.plan(rows, budget)

        ways = {"extra pass": (True, by_length, True), "in update": (False, by_length, True),
                "consecutive": (False, consecutive, True), "whole rows": (False, by_length, False)}
        times: dict[str, list[float]] = {way: [] for way in ways}
        times["logprobs pass"] = []
        metrics: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for way, (extra_pass, cut, share) in ways.items():
                backend.model.load_state_dict(start)
                micro_batches.by_length, backend.options.share_prompts = cut, share
                part = copy.copy(batch)
                t0 = time.perf_counter()
                if extra_pass:
                    before = backend.logprobs(batch=part, reference=False)
                    times["logprobs pass"].append(time.perf_counter() - t0)
                    metrics[way] = logprob_mismatch(before, part.rollout_logprobs, part.response_mask)
                    metrics[way]["loss"] = backend.update(batch=part, loss=loss, plan=UpdatePlan())["loss"]
                else:
                    metrics[way] = finish_mismatch(backend.update(batch=part, loss=loss, plan=UpdatePlan()))
                times[way].append(time.perf_counter() - t0)
        micro_batches.by_length = by_length
    med = {way: statistics.median(values) for way, values in times.items()}
    budget = backend.options.micro_batch_tokens
    real = int(batch.prompt_mask.sum() + batch.attention_mask.sum())
    padded = {"consecutive": sum(mb.padded_tokens for mb in micro_batches.plan(batch, budget)),
              "by length": sum(mb.padded_tokens for mb in by_length(batch, budget, 128)[1])}
    print(f"batch: {len(batch)} rows, {int(batch.response_mask.sum())} response tokens, {real} real tokens; "
          f"{args.rounds} alternating rounds, medians")
    print(f"generation through transformers' forward: KV cache concatenated every step {old_generation:.2f} s, "
          f"written in place {transformers_generation:.2f} s ({old_generation / transformers_generation:.2f}x; the "
          f"same tokens: {same_cache_tokens})")
    print(f"generation: decode steps' Linear layers and LM head in the way measured fastest here (layers "
          f"{chosen[0]}, head {chosen[1]}) {generation:.2f} s; forced, against it: " + ", ".join(
              f"{way} {seconds:.2f} s ({seconds / generation:.2f}x; the same tokens: {same_tokens[way]})"
              for way, seconds in gemm_generation.items()))
    print(f"generation: decode steps through transformers' forward {transformers_generation:.2f} s, written out "
          f"{generation:.2f} s ({transformers_generation / generation:.2f}x; the same tokens: "
          f"{same_tokens['transformers step']}); the step below "
          f"{(transformers_generation + med['in update']) / (generation + med['in update']):.2f}x faster for it")
    print(f"the step below is {(gemm_generation['x @ W.T'] + med['in update']) / (generation + med['in update']):.2f}x "
          "faster than with x @ W.T")
    print("| way | logprobs + update (s) | step incl. generation (s) |\n|---|---|---|")
    for way in ways:
        print(f"| {way} | {med[way]:.2f} | {generation + med[way]:.2f} |")
    step = {way: generation + med[way] for way in ways}
    print(f"extra no-grad pass {med['logprobs pass']:.2f} s: the step is {step['extra pass'] / step['in update']:.2f}x "
          f"faster with the mismatch measured in the update")
    print(f"padded tokens: consecutive {padded['consecutive']} ({padded['consecutive'] / real:.2f}x the real ones), "
          f"by length {padded['by length']} ({padded['by length'] / real:.2f}x); update "
          f"{med['consecutive'] / med['in update']:.2f}x, step {step['consecutive'] / step['in update']:.2f}x faster by length")
    prompt_tokens = int(batch.prompt_mask.sum())
    print(f"prompts: {prompt_tokens} of the {real} real tokens; the update is "
          f"{med['whole rows'] / med['in update']:.2f}x, the step {step['whole rows'] / step['in update']:.2f}x "
          f"faster with each distinct prompt run once; grad_norm relative difference "
          f"{relative(metrics['whole rows'], metrics['in update'], 'grad_norm'):.1e}")
    mismatch = [k for k in metrics["extra pass"] if k.startswith("mismatch/")]
    print("largest difference of the mismatch metrics, extra pass vs in update: "
          f"{max(abs(metrics['extra pass'][k] - metrics['in update'][k]) for k in mismatch):.2e} "
          f"(abs_diff_max {metrics['extra pass']['mismatch/abs_diff_max']:.2e}); grad_norm relative difference, "
          f"consecutive vs by length: {relative(metrics['consecutive'], metrics['in update'], 'grad_norm'):.1e}")


def relative(a: dict[str, float], b: dict[str, float], key: str) -> float:
    """|a - b| / |b| of metric `key` (on-policy the loss itself is the same whatever the logprobs)."""
    return abs(a[key] - b[key]) / abs(b[key])


if __name__ == "__main__":
    main()
