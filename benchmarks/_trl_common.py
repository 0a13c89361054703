"""Worker side of `benchmarks/trl_compare.py`: building the benchmark models, the matmul peak, and one
timed run of rlcore or of TRL's `GRPOTrainer`, each in its own process.

A worker is started as `python benchmarks/trl_compare.py --worker KIND --spec JSON --out FILE`; it
writes one JSON object to FILE. Nothing here imports torch at module level, so the driver process that
only alternates the workers and prints the report stays small.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared_data import QWEN3_TOKENIZER, SMOLLM2  # noqa: E402

QWEN_VOCAB, QWEN_PAD, QWEN_EOS = 151669, 151643, 151645
"""The Qwen2.5/Qwen3 tokenizer's full vocabulary (with added tokens), <|endoftext|> and <|im_end|>."""

MODELS: dict[str, dict[str, int]] = {
    # Random Qwen2s with the real 151k vocabulary (tied embeddings, like Qwen2.5-0.5B): the LM head is a
    # large share of the work, as in real small Qwen models.
    "5m": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 2},
    "50m": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 10, "num_attention_heads": 4,
            "num_key_value_heads": 2},
}


def setup_environment() -> None:
    """Thread and offline settings that must precede `import torch` in every worker."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_DISABLED", "true")


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status (VmRSS, VmHWM)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb = line.split()[:2]
                values[key] = int(kb) / 1024
    return values.get("VmRSS:", float("nan")), values.get("VmHWM:", float("nan"))


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"python": sys.executable, "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": str(torch.get_num_threads()), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out


# ---- models -------------------------------------------------------------------------------------


def prepare_model(name: str, directory: Path) -> dict[str, Any]:
    """Build (or reuse) the benchmark model in `directory` and describe it (parameter counts, shape)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").exists():
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if name == "smollm":
            from rlcore.models import dequantize_gguf

            dequantize_gguf(SMOLLM2.parent, SMOLLM2.name, tmp)  # the driver checked that it exists
        else:
            tmp.mkdir(parents=True)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(QWEN3_TOKENIZER / f, tmp / f)
            config = Qwen2Config(vocab_size=QWEN_VOCAB, max_position_embeddings=2048, tie_word_embeddings=True,
                                 pad_token_id=QWEN_PAD, eos_token_id=QWEN_EOS, bos_token_id=None,
                                 **MODELS[name])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = Qwen2ForCausalLM(config)
            model.generation_config = GenerationConfig(eos_token_id=[QWEN_EOS, QWEN_PAD], pad_token_id=QWEN_PAD)
            model.save_pretrained(tmp)
        tmp.replace(directory)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return {"dir": str(directory), "params": total, "embedding_params": embed, "tied": tied,
            "non_embedding_params": total - embed - (0 if tied else model.get_output_embeddings().weight.numel()),
            "vocab": config.vocab_size, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "intermediate": config.intermediate_size, "model_type": config.model_type}


def _best_seconds(fn: Any, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(size: int = 4096, reps: int = 3, budget_s: float = 40.0) -> dict[str, Any]:
    """Best-of-reps FLOP/s of a size x size matmul in fp32 and in bf16, with this process's threads.

    Each dtype is timed through `torch.mm(a, b)` and `F.linear(a, b)` (a @ b.T, the kernel `nn.Linear` and
    autocast use), and the faster is its peak: on CPUs without AVX512-BF16/AMX the two take different
    kernels and `mm` in bf16 can be 100x slower than `linear`. A 1024 probe first predicts the time of the
    full size; when `reps + 1` products would exceed `budget_s` the size is halved until they fit (the size
    used is reported), so a machine with a pathological bf16 path still finishes.
    """
    import torch
    import torch.nn.functional as F

    out: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        probe_n = min(1024, size)
        a, b = torch.randn(probe_n, probe_n, dtype=dtype), torch.randn(probe_n, probe_n, dtype=dtype)
        probes = {"mm": _best_seconds(lambda: torch.mm(a, b), 1), "linear": _best_seconds(lambda: F.linear(a, b), 1)}
        op = min(probes, key=probes.get)
        n = size
        while n > probe_n and probes[op] * (n / probe_n) ** 3 * (reps + 1) > budget_s:
            n //= 2
        fn = {"mm": torch.mm, "linear": F.linear}[op]
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        seconds = _best_seconds(lambda: fn(a, b), reps)
        out[name] = 2 * n**3 / seconds
        out[f"{name}_size"] = n
        out[f"{name}_op"] = op
        out[f"{name}_probe_gflops"] = {k: 2 * probe_n**3 / v / 1e9 for k, v in probes.items()}
    return out


# ---- the shared workload --------------------------------------------------------------------------


def task_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The task's options: arithmetic's instruct prompts (chat template, single-digit additions), or GSM8K
    read from the files `spec["gsm8k"]` names (both splits; the train split gives the prompts)."""
    if spec.get("task") == "gsm8k":
        return {"train_path": spec["gsm8k"]["train"], "test_path": spec["gsm8k"]["test"]}
    return {"style": "instruct", "ops": "+", "min_operand": 0, "max_operand": 9}


def make_task(spec: dict[str, Any]) -> Any:
    """The rlcore task both sides draw prompts from and score with."""
    from rlcore.plugins import instantiate, load

    return instantiate(load("task", spec.get("task", "arithmetic")), task_options(spec), "task")


def prompt_schedule(spec: dict[str, Any]) -> list[Any]:
    """The prompts rlcore's loop draws (its seeded `PromptStream` over the task's train split), in order."""
    from rlcore.data import PromptStream

    stream = PromptStream(make_task(spec).dataset("train"), seed=spec["seed"])
    return [p for _ in range(spec["warmup"] + spec["steps"]) for p in stream.take(spec["prompts"])]


# ---- rlcore --------------------------------------------------------------------------------------


def rlcore_dtype(spec: dict[str, Any]) -> str:
    """rlcore's dtype: `--rlcore-dtype` where given, else the one both sides share."""
    return spec.get("rlcore_dtype") or spec["dtype"]


def run_rlcore(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """rlcore's default stack (grpo, torch backend, hf rollout) on the task through `rlcore.loop.Trainer`;
    phase timings come from the run's own `metrics.jsonl`."""
    import torch

    from rlcore import preflight
    from rlcore.loop import Trainer
    from rlcore.metrics import MetricsLog
    from rlcore.models import read_config
    from rlcore.run_config import resolve

    run_dir = work / "rlcore-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    total = spec["warmup"] + spec["steps"]
    raw = {
        "plugins": {"algo": "grpo", "backend": "torch", "rollout": spec.get("rollout", "hf"),
                    "task": spec.get("task", "arithmetic"), "hardware": "cpu"},
        # rlcore's defaults otherwise: `log_mismatch` costs nothing on-policy (the update's forward measures it)
        "trainer": {"model": spec["model_dir"], "steps": total, "seed": spec["seed"],
                    "prompts_per_step": spec["prompts"], "save_every": 0, "eval_every": 0},
        # min_new_tokens = max_new_tokens: a fixed completion length, as TRL's generation_kwargs below
        "sampling": {"n": spec["group"], "temperature": 1.0, "top_p": 1.0, "max_new_tokens": spec["tokens"],
                     "min_new_tokens": spec["tokens"]},
        "backend": {"lr": spec["lr"], "dtype": rlcore_dtype(spec), "max_grad_norm": 1.0, "weight_decay": 0.0,
                    **spec.get("rlcore_backend", {})},
        "task": task_options(spec),
    }
    if spec.get("rollout", "hf") == "hf":
        raw["rollout"] = {"dtype": rlcore_dtype(spec)}  # generation in the same precision as the update
    cfg = preflight.settle(resolve(raw), read_config(spec["model_dir"]))  # `auto` as `rlcore run` settles it
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, progress=False)
    trainer.setup()
    setup_s = time.perf_counter() - t0
    rss_setup = rss_mib()[0]
    walls = []
    try:
        for _ in range(total):
            start = time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            row = {"step": trainer.step, **metrics}
            trainer.metrics.write(row)
            walls.append(time.perf_counter() - start)
    finally:
        trainer.close()
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    steps = []
    for row, wall in list(zip(rows, walls))[spec["warmup"]:]:
        steps.append({
            "wall": wall,
            "sample": row.get("timing/sample", 0.0),
            "score": row.get("timing/score", 0.0),
            "logprob": row.get("timing/logprobs", 0.0),
            "advantage": row.get("timing/advantage", 0.0),
            "update": row.get("timing/update", 0.0),
            "sync": row.get("timing/sync", 0.0),
            "gen_tokens": row["rollout/tokens"],
            "update_tokens": row["update/tokens_per_s"] * row["update/seconds"],
            "response_length_mean": row["response_length/mean"],
            "rollout_tokens_per_s": row["rollout/tokens_per_s"],
            "update_tokens_per_s": row["update/tokens_per_s"],
        })
    return {"side": "rlcore", "setup_s": setup_s, "rss_setup_mib": rss_setup, "steps": steps,
            "dtype": cfg.options["backend"].dtype, "threads": torch.get_num_threads(),
            "rollout": cfg.selection["rollout"], "micro_batch_tokens": cfg.options["backend"].micro_batch_tokens,
            "log_mismatch": cfg.trainer.log_mismatch,
            "share_prompts": bool(getattr(cfg.options["backend"], "share_prompts", False))}


# ---- TRL -----------------------------------------------------------------------------------------


class PhaseClock:
    """Accumulates seconds per phase within a step; `close_step` files them and starts the next step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.last_end: float | None = None
        self.step_begin: float | None = None

    def wrap(self, obj: Any, name: str, phase: str, when: Any = None) -> None:
        """Replace the bound method `obj.name` by a timed one adding to `phase` (or to `when()`'s phase)."""
        original = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[when() if when else phase] += time.perf_counter() - start

        setattr(obj, name, timed)

    def close_step(self) -> None:
        now = time.perf_counter()
        begin = self.last_end if self.last_end is not None else self.step_begin
        self.current["wall"] = now - (begin if begin is not None else now)
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)
        self.last_end = now


def run_trl(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same model, prompts, group size, completion length, lr and dtype, no KL,
    no reference model, one optimizer step per generation batch."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlcore import Prompt
    from rlcore.models import load_tokenizer

    out_dir = work / "trl-run"
    shutil.rmtree(out_dir, ignore_errors=True)
    total = spec["warmup"] + spec["steps"]
    P, G, T = spec["prompts"], spec["group"], spec["tokens"]
    task = make_task(spec)
    prompts = prompt_schedule(spec)
    dataset = Dataset.from_list([{"prompt": p.messages, "answer": str(p.answer)} for p in prompts])

    def task_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [task.reward(text, Prompt(messages=[], answer=a))["reward"] for text, a in zip(texts, answer)]

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(out_dir), report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True,
        use_cpu=True, bf16=spec["dtype"] == "bfloat16", fp16=False, seed=spec["seed"], dataloader_num_workers=0,
        max_steps=total, per_device_train_batch_size=P * G, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=G, num_iterations=1, max_completion_length=T, generation_kwargs={"min_new_tokens": T},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, loss_type="dapo", epsilon=0.2,
        gradient_checkpointing=False, shuffle_dataset=False, log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=task_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    clock = PhaseClock()
    clock.wrap(trainer, "_calculate_rewards", "score")
    clock.wrap(trainer, "_prepare_inputs", "prepare")
    clock.wrap(trainer, "training_step", "train_step")
    clock.wrap(trainer, "compute_loss", "forward")
    # Called without grad from `_generate_and_score_completions` (old / reference logprobs: the logprob phase),
    # and with grad from the loss (part of the update).
    clock.wrap(trainer, "_get_per_token_logps_and_entropies", "",
               when=lambda: "policy_forward" if torch.is_grad_enabled() else "logprob")
    lengths: list[int] = []
    prompt_lengths: list[int] = []
    original_generate = trainer._generate

    def counting_generate(prompts_: list[Any]) -> Any:
        result = original_generate(prompts_)  # (prompt_ids, completion_ids, ...): one token list per completion
        prompt_lengths.extend(len(ids) for ids in result[0])
        lengths.extend(len(ids) for ids in result[1])
        return result

    trainer._generate = counting_generate
    clock.wrap(trainer, "_generate", "sample")

    class StepEnd(TrainerCallback):
        def on_step_begin(self, args_: Any, state: Any, control: Any, **kw: Any) -> None:
            if clock.step_begin is None:
                clock.step_begin = time.perf_counter()

        def on_step_end(self, args_: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.current["gen_tokens"] = float(sum(lengths))
            clock.current["update_tokens"] = float(sum(lengths) + sum(prompt_lengths))
            clock.current["response_length_mean"] = sum(lengths) / max(len(lengths), 1)
            lengths.clear()
            prompt_lengths.clear()
            clock.close_step()

    trainer.add_callback(StepEnd())
    setup_s = time.perf_counter() - t0
    rss_setup = rss_mib()[0]
    trainer.train()
    steps = []
    for raw in clock.steps[spec["warmup"]:]:
        sample = raw.get("sample", 0.0)
        prepare = raw.get("prepare", 0.0)
        train_step = raw.get("train_step", 0.0)
        steps.append({
            "wall": raw["wall"], "sample": sample, "score": raw.get("score", 0.0),
            "logprob": raw.get("logprob", 0.0),
            # everything of the step that is not generation/scoring: forward, backward, clip, optimizer step
            "update": raw["wall"] - prepare,
            "fwd_bwd": train_step - prepare, "forward": raw.get("forward", 0.0),
            "optim_and_rest": raw["wall"] - train_step,
            "prepare_other": prepare - sample - raw.get("score", 0.0) - raw.get("logprob", 0.0),
            "gen_tokens": raw.get("gen_tokens", 0.0), "update_tokens": raw.get("update_tokens", 0.0),
            "response_length_mean": raw.get("response_length_mean", 0.0),
        })
    return {"side": "trl", "setup_s": setup_s, "rss_setup_mib": rss_setup, "steps": steps,
            "dtype": "bfloat16" if args.bf16 else "float32", "threads": torch.get_num_threads(),
            "optim": str(args.optim), "gradient_checkpointing": args.gradient_checkpointing}


# ---- worker entry ----------------------------------------------------------------------------------


def worker_main(kind: str, spec_json: str, out: str) -> int:
    setup_environment()
    spec = json.loads(spec_json)
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    if kind == "prepare":
        result: dict[str, Any] = {"model": prepare_model(spec["model"], Path(spec["model_dir"]))}
    elif kind == "peak":
        result = {"peak": matmul_peak(budget_s=spec.get("peak_budget", 40.0))}
    elif kind == "rlcore":
        result = run_rlcore(spec, work)
    elif kind == "trl":
        result = run_trl(spec, work)
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    result["versions"] = versions()
    result["rss_peak_self_mib"] = rss_mib()[1]
    result["ru_maxrss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(result))
    return 0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
