"""Update throughput of the torch, fsdp and lora backends on a ~50M-parameter Qwen2, against matmul peak.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/update_speed.py            # 2 threads; fsdp: 2 ranks x 1 thread

Builds a seeded random Qwen2 (hidden 512, 8 layers, synthetic 32k vocabulary) offline, measures the
machine's fp32 and bf16 peak with a 4096x4096 matmul, then times `update` (GRPO's clipped loss, one
optimizer step on 16 sequences of 64 prompt + 64 response tokens) for each backend (`lora-fsdp`: the
lora backend with `base: fsdp`, 2 ranks). The achieved model FLOP/s is reported against both measured
peaks: the bf16 matmul peak (what GPU and AMX figures are quoted against) and the fp32 one (the fast path
on a CPU without bf16 matmul units, where training runs fp32). Model FLOPs per
token follow the PaLM convention: 6 N (forward + backward of the N matmul parameters of the decoder
layers) + 12 L d S (attention scores over a context of S), plus 6 V d for the LM head on response tokens
only (the backends compute logits only there). LoRA freezes the base, so its backward computes no weight
gradients: 4 N instead of 6 N (the adapters themselves are negligible).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402 - after the thread environment is set

from rlcore import RolloutBatch, UpdatePlan  # noqa: E402
from rlcore.plugins import instantiate, load  # noqa: E402
from rlcore.testing import make_batch, make_context  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE = 32000, 512, 8, 8, 1408


def matmul_peak(dtype: torch.dtype, size: int = 4096, reps: int = 3, budget_s: float = 20.0) -> tuple[float, int]:
    """FLOP/s of a size x size matmul in `dtype` (best of `reps`, after one warm-up), and the size used.

    A 512 probe first: where `dtype` has no fast kernels (bf16 on a CPU without AVX512-BF16/AMX runs
    ~50x slower than fp32) the size shrinks by halves until the measurement fits in `budget_s`.
    """
    small = torch.randn(512, 512, dtype=dtype)
    probe = _seconds(small, small)
    while size > 512 and probe * (size / 512) ** 3 * (reps + 1) > budget_s:
        size //= 2
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_seconds(a, b) for _ in range(reps))
    return 2 * size**3 / best, size


def _seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def percent(share: float) -> str:
    """A utilisation as a percentage, one decimal below 10% (far above 100% against bf16 on a CPU without bf16
    matmul units, where the fp32 training outruns the bf16 peak)."""
    return f"{100 * share:.1f}%" if share < 0.1 else f"{100 * share:,.0f}%"


def build_model(directory: Path) -> int:
    """Save the seeded random model (with the tiny tokenizer files, unused here) and return its parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlcore.models import build_tiny_tokenizer

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory)
    build_tiny_tokenizer(directory)
    return sum(p.numel() for p in model.parameters())


def training_batch(sequences: int, prompt: int, response: int) -> RolloutBatch:
    batch = make_batch(groups=sequences // 4, n=4, prompt_len=prompt, response_len=response, vocab=VOCAB,
                       lengths=[response] * sequences, seed=1, with_advantages=True)
    batch.prompt_mask = torch.ones_like(batch.prompt_mask)
    batch.prompt_ids = torch.randint(3, VOCAB, batch.prompt_ids.shape, generator=torch.Generator().manual_seed(2))
    return batch


def flops_per_update(batch: RolloutBatch, lora: bool) -> float:
    """Model FLOPs of one forward + backward over the batch (see the module docstring)."""
    layer_params = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE)
    tokens = float(batch.prompt_mask.sum() + batch.attention_mask.sum())
    context = batch.prompt_ids.shape[1] + batch.response_ids.shape[1]
    response_tokens = float(batch.attention_mask.sum())
    passes = 4 if lora else 6
    return passes * layer_params * tokens + 12 * LAYERS * HIDDEN * context * tokens + \
        passes * VOCAB * HIDDEN * response_tokens


def time_backend(name: str, options: dict[str, Any], ctx: Any, batch: RolloutBatch, loss: Any,
                 repeats: int) -> list[float]:
    """Seconds per `update` call (after one warm-up call)."""
    cls = load("backend", name)
    backend = instantiate(cls, options, "backend")
    backend.setup(ctx=ctx)
    try:
        backend.update(batch=batch, loss=loss, plan=UpdatePlan())
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.update(batch=batch, loss=loss, plan=UpdatePlan())
            seconds.append(time.perf_counter() - start)
        return seconds
    finally:
        teardown = getattr(backend, "teardown", None)
        if teardown is not None:
            teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fsdp: split over its ranks)")
    parser.add_argument("--repeats", type=int, default=3, help="timed update calls per backend")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--backends", default="torch,fsdp,lora,lora-fsdp")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (bfloat16: autocast, and fsdp's param_dtype); only fast with bf16 "
                             "matmul hardware (AMX, GPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak32, size32 = matmul_peak(torch.float32)
    peak16, size16 = matmul_peak(torch.bfloat16)
    print(f"matmul peak, {args.threads} threads: fp32 {peak32 / 1e12:.3g} TFLOP/s ({size32}x{size32}), "
          f"bf16 {peak16 / 1e12:.3g} TFLOP/s ({size16}x{size16})", flush=True)

    with tempfile.TemporaryDirectory(prefix="rlcore-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        params = build_model(model_dir)
        ctx = make_context(Path(tmp), model_dir)
        batch = training_batch(args.sequences, args.prompt, args.response)
        tokens = float(batch.prompt_mask.sum() + batch.attention_mask.sum())
        loss = instantiate(load("algo", "grpo"), None, "algo").policy_loss()
        print(f"Qwen2 {params / 1e6:.1f}M parameters (hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}); "
              f"update on {args.sequences} x ({args.prompt} + {args.response}) = {tokens:.0f} tokens, {args.dtype}",
              flush=True)
        print()
        print(f"| backend | processes x threads | s / update | tokens/s | model TFLOP/s | % of bf16 matmul peak | "
              "% of fp32 matmul peak |")
        print("|---|---|---|---|---|---|---|")
        runs = {"torch": ({"lr": 1e-5, "dtype": args.dtype}, f"1 x {args.threads}"),
                "fsdp": ({"lr": 1e-5, "dtype": args.dtype, "param_dtype": args.dtype, "world_size": 2},
                         f"2 x {max(1, args.threads // 2)}"),
                "lora": ({"lr": 1e-4, "dtype": args.dtype, "rank": 16}, f"1 x {args.threads}"),
                "lora-fsdp": ({"lr": 1e-4, "dtype": args.dtype, "rank": 16, "base": "fsdp", "world_size": 2,
                               "param_dtype": args.dtype}, f"2 x {max(1, args.threads // 2)}")}
        for name in args.backends.split(","):
            options, layout = runs[name]
            plugin = name.split("-")[0]
            seconds = statistics.median(time_backend(plugin, options, ctx, batch, loss, args.repeats))
            achieved = flops_per_update(batch, lora=plugin == "lora") / seconds
            print(f"| {name} | {layout} | {seconds:.2f} | {tokens / seconds:,.0f} | {achieved / 1e12:.3g} | "
                  f"{percent(achieved / peak16)} | {percent(achieved / peak32)} |", flush=True)


if __name__ == "__main__":
    main()
