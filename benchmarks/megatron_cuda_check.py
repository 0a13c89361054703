"""The megatron backend for real on one CUDA GPU, against the torch backend: same weights, same batches, same loss.

Builds a random small Qwen2 on the spot (no download), then runs `--steps` GRPO updates (rlcore's grpo algorithm:
group-normalised advantages of random 0/1 rewards, the clipped surrogate) with the torch backend and with the
megatron backend (Megatron-core GPTModel, tp=1, pp=1, NCCL, no CPU shims) from the same initial weights on the same
batches, and prints each step's loss and gradient norm from both, the largest differences (loss, gradient norm,
logprobs after the last step) and each backend's update tokens/s (median after the first, warm-up, step).
It also saves the megatron backend's checkpoint (megatron-core dist_checkpointing) and loads it back.

Needs: a CUDA GPU, torch, transformers, megatron-core (0.16.1), and rlcore's small pure-Python dependencies
pluggy and attrs; rlcore itself is imported from this repository (nothing to install). Exit status 0 when the
backends agree within --rtol, 1 when they do not, 2 when something it needs is missing.

    python benchmarks/megatron_cuda_check.py --steps 5
    python benchmarks/megatron_cuda_check.py --check-setup     # build the model and batches only (any machine)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for part in ("core", "plugins/algorithms", "plugins/backends", "plugins/hardware", "plugins/tasks"):
    sys.path.insert(0, str(REPO / part))  # also in the megatron workers, which re-import this module (spawn)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

NEEDED = ("torch", "transformers", "megatron.core", "pluggy", "attrs")


def missing_modules() -> list[str]:
    out = []
    for name in NEEDED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            out.append(name)
    return out


def build_model(directory: Path, args: argparse.Namespace) -> Path:
    """A seeded random Qwen2 (grouped-query attention, qkv bias, untied head) with the character tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlcore.models import build_tiny_tokenizer

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(args.seed)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    build_tiny_tokenizer(directory)
    return directory


def build_batches(args: argparse.Namespace) -> list:
    """One GRPO batch per step: random prompts and responses of varied length, random 0/1 rewards, grpo's
    group-normalised advantages."""
    from rlcore.testing.builders import make_batch
    from rlcore_algorithms.grpo import GRPO

    algo = GRPO(GRPO.Options())
    batches = []
    for step in range(args.steps):
        batch = make_batch(groups=args.groups, n=args.n, prompt_len=args.prompt_len, response_len=args.response_len,
                           vocab=args.vocab, seed=args.seed + step)
        batch.advantages = algo.advantage(batch=batch)
        batches.append(batch)
    return batches


def context(run_dir: Path, model_dir: Path, seed: int):  # noqa: ANN201
    """The RunContext of a run on the cuda hardware plugin (registered directly: no entry points needed)."""
    from rlcore import models
    from rlcore.context import Hardware, RunContext
    from rlcore.plugins import Registry
    from rlcore_hardware.cuda import CUDA

    registry = Registry()
    registry.register("hardware", "cuda", CUDA())
    return RunContext(config={}, run_dir=run_dir, model=models.resolve(str(model_dir), run_dir, seed),
                      hardware=Hardware(registry.hook, "cuda"), seed=seed)


def timed_updates(backend, batches, loss) -> tuple[list[dict], list[float]]:  # noqa: ANN001
    import torch

    from rlcore import UpdatePlan

    metrics, speeds = [], []
    for batch in batches:
        torch.cuda.synchronize()
        start = time.perf_counter()
        metrics.append(backend.update(batch=batch, loss=loss, plan=UpdatePlan()))
        torch.cuda.synchronize()
        tokens = int(batch.prompt_mask.sum() + batch.attention_mask.sum())
        speeds.append(tokens / (time.perf_counter() - start))
    return metrics, speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--groups", type=int, default=8, help="prompts per batch")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--rtol", type=float, default=None,
                        help="largest relative loss / grad-norm difference accepted (default 1e-4 fp32, 2e-2 bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-setup", action="store_true",
                        help="only build the model and the batches and print their sizes (no GPU needed)")
    args = parser.parse_args()
    missing = missing_modules()
    if missing:
        print(f"missing Python modules: {', '.join(missing)} (pip install {' '.join(m.split('.')[0] for m in missing)};"
              " megatron-core==0.16.1)", file=sys.stderr)
        return 2
    import torch

    work = Path(tempfile.mkdtemp(prefix="megatron-cuda-check-"))
    model_dir = build_model(work / "model", args)
    batches = build_batches(args)
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    print(f"model: random Qwen2, {args.layers} layers, hidden {args.hidden}, {params / 1e6:.1f}M parameters; "
          f"{args.steps} batches of {len(batches[0])} samples x ({args.prompt_len} + {args.response_len}) tokens")
    if args.check_setup:
        return 0
    if not torch.cuda.is_available():
        print(f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}); --check-setup builds the model and batches without one", file=sys.stderr)
        return 2
    from rlcore_algorithms.grpo import GRPO
    from rlcore_backends.update.megatron.backend import MegatronBackend
    from rlcore_backends.update.torch.backend import TorchBackend

    loss = GRPO(GRPO.Options()).policy_loss()
    shared = {"lr": args.lr, "dtype": args.dtype, "max_grad_norm": 1.0}
    ctx = context(work / "run", model_dir, args.seed)
    reference = TorchBackend(TorchBackend.Options(**shared))
    reference.setup(ctx=ctx)
    torch_metrics, torch_speed = timed_updates(reference, batches, loss)
    megatron = MegatronBackend(MegatronBackend.Options(tp=1, pp=1, **shared))
    megatron.setup(ctx=ctx)
    try:
        megatron_metrics, megatron_speed = timed_updates(megatron, batches, loss)
        last = batches[-1].to("cpu")
        logp_torch = reference.logprobs(batch=last, reference=False).cpu()
        logp_megatron = megatron.logprobs(batch=last, reference=False).cpu()
        megatron.save_state(directory=work / "ckpt")
        megatron.load_state(directory=work / "ckpt")
        reloaded = megatron.logprobs(batch=last, reference=False).cpu()
    finally:
        megatron.teardown()
    print(f"{'step':>4} {'loss torch':>14} {'loss megatron':>14} {'grad_norm torch':>16} {'grad_norm megatron':>19}")
    for i, (a, b) in enumerate(zip(torch_metrics, megatron_metrics), 1):
        print(f"{i:>4} {a['loss']:>14.8f} {b['loss']:>14.8f} {a['grad_norm']:>16.8f} {b['grad_norm']:>19.8f}")

    def rel(key: str) -> float:
        return max(abs(a[key] - b[key]) / max(abs(a[key]), 1e-12) for a, b in zip(torch_metrics, megatron_metrics))

    mask = last.attention_mask.bool()
    loss_abs = max(abs(a["loss"] - b["loss"]) for a, b in zip(torch_metrics, megatron_metrics))
    logp_diff = float((logp_torch - logp_megatron)[mask].abs().max())
    reload_diff = float((reloaded - logp_megatron)[mask].abs().max())
    rtol = args.rtol if args.rtol is not None else (1e-4 if args.dtype == "float32" else 2e-2)
    print(f"loss: max |torch - megatron| {loss_abs:.3e} (relative {rel('loss'):.3e}); grad_norm relative "
          f"{rel('grad_norm'):.3e}; logprobs after step {args.steps}: max |diff| {logp_diff:.3e}; "
          f"checkpoint save + load: max |diff| {reload_diff:.3e}")
    later = slice(1, None) if args.steps > 1 else slice(None)
    t, m = statistics.median(torch_speed[later]), statistics.median(megatron_speed[later])
    print(f"update tokens/s ({args.dtype}, {torch.cuda.get_device_name()}): torch {t:,.0f}, megatron {m:,.0f} "
          f"(megatron / torch {m / t:.2f}x)")
    ok = rel("loss") <= rtol and rel("grad_norm") <= rtol and reload_diff <= 1e-6
    print("AGREE" if ok else f"DIFFER (rtol {rtol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
