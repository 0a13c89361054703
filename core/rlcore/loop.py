"""The training loop: one step samples, scores, filters, estimates advantages, updates and syncs weights.

Each phase is a hook of the selected plugin (see `rlcore.hookspecs`); the loop owns only what is
shared by every combination: the prompt stream, dynamic re-sampling, metrics, checkpoints, resuming.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from rlcore import host_memory, models, preflight
from rlcore.checkpoint import Checkpoints, load_rng, save_rng
from rlcore.context import Hardware, RunContext
from rlcore.contract import Contract
from rlcore.data import PromptStream
from rlcore.errors import CheckpointError, TrainingError
from rlcore.evaluate import evaluate, turn_inputs
from rlcore.generations import GenerationLog
from rlcore.metrics import MetricsLog, ProgressDisplay, finish_mismatch, logprob_mismatch
from rlcore.pipeline import Collected, RolloutPipeline, batch_seed
from rlcore.prompt_fit import PromptFit, prompt_fit
from rlcore.plugins import SELECTED_KINDS, Registry, construct, instantiate
from rlcore.run_config import ResolvedConfig
from rlcore.scoring import check_finite
from rlcore.stopping import GracefulStop
from rlcore.types import PolicyLoss, Prompt, RolloutBatch, UpdatePlan, Weights

log = logging.getLogger("rlcore")
QUEUE_FILE = "queued_batches.pt"
"""In an asynchronous run's checkpoint: the batches sampled ahead of its step (see `Trainer.save`)."""
MISMATCH_WARNING_NATS = 1e-4
"""Mean |rollout - trainer| logprob per token above which a run without `algo.tis_cap` is warned, once: float32
and bfloat16_matched sit below 3e-6, plain bfloat16 at 7e-4 (the tiny model) to 0.04 (SmolLM2)."""


@attrs.define
class Summary:
    """The outcome of a run, also written to `summary.json`."""

    run_dir: str
    steps: int
    reward_start: float
    reward_end: float
    seconds: float
    last_checkpoint: str | None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _numeric_means(infos: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Mean of every numeric per-sample info key, as `<prefix><key>` (strings such as finish reasons are skipped)."""
    keys = sorted({k for info in infos for k, v in info.items() if isinstance(v, (int, float))})
    return {f"{prefix}{k}": _mean([float(info[k]) for info in infos if isinstance(info.get(k), (int, float))])
            for k in keys}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def open_registry(cfg: ResolvedConfig, kinds: tuple[str, ...], trace: bool = False, trackers: bool = False) -> Registry:
    """Register the selected placement plugin, then the selected plugins of `kinds` as it places them
    (in process, or proxies to workers elsewhere), then the trackers `trainer.log_to` selects (for
    training runs only: `trackers`), then the extras. Trackers and extras run in this process."""
    registry = Registry(trace=trace)
    name = cfg.selection["placement"]
    registry.register("placement", name, construct(cfg.classes["placement"], cfg.options["placement"]))
    for kind in kinds:
        if kind == "placement":
            continue
        cls = cfg.classes[kind]
        options = cfg.options[kind] if getattr(cls, "Options", None) is not None else None
        registry.register(kind, cfg.selection[kind],
                          registry.require("placement", "place", kind=kind, name=cfg.selection[kind], cls=cls,
                                           options=options))
    for name, cls in cfg.trackers.items() if trackers else ():
        registry.register("tracker", name, construct(cls, cfg.tracker_options[name]))
    for extra, cls in cfg.extras.items():
        registry.register("extra", extra, instantiate(cls, None, f"extra.{extra}"))
    return registry


def make_context(cfg: ResolvedConfig, registry: Registry, run_dir: Path, resumed: bool = False,
                 model: str | None = None) -> RunContext:
    """Seed every generator, resolve the model (building the embedded one if needed) and bundle the run."""
    seed = cfg.trainer.seed
    hardware = Hardware(registry.hook, cfg.selection["hardware"])
    random.seed(seed)
    torch.manual_seed(seed)
    hardware.manual_seed(seed)
    spec = models.resolve(cfg.trainer.model if model is None else model, run_dir, seed)
    return RunContext(config=cfg.to_dict(), run_dir=run_dir, model=spec, hardware=hardware, seed=seed,
                      resumed=resumed)


class Trainer:
    """One run: the registered plugins, the prompt stream, metrics and checkpoints."""

    def __init__(self, cfg: ResolvedConfig, run_dir: Path, trace: bool = False, progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.show_progress = progress
        self.registry = open_registry(cfg, SELECTED_KINDS, trace=trace, trackers=True)
        self.hook = self.registry.hook
        self.contract = Contract(cfg.selection)
        self.checkpoints = Checkpoints(run_dir / "checkpoints", keep=cfg.trainer.keep_checkpoints)
        self.step = 0
        self.rewards: list[float] = []
        self.warned_fill = False
        self.warned_mismatch = False
        self.resumed_from: Path | None = None
        self.skipped: list[tuple[Path, str]] = []
        """Checkpoints newer than `resumed_from` that were incomplete (and removed), with the reason."""
        self.stopped_by: str | None = None
        """The signal that stopped the run early, if one did."""
        self.error_steps = 0
        """Consecutive steps on which the reward function raised on every sample."""
        self.closed = False
        self.working_on: int | None = None
        """The step under way in `run` (its number), None between steps."""
        self.pipeline: RolloutPipeline | None = None
        """The rollout thread while `run` trains asynchronously (`trainer.max_staleness` >= 1)."""
        self.queued: list[Collected] = []
        """Batches a resumed checkpoint had sampled ahead (asynchronous runs), handed to the pipeline first."""
        self.rollout_weights: Weights | None = None
        """What the rollout engine holds when `run` starts the pipeline (a snapshot of the current policy)."""

    # ---- setup ----------------------------------------------------------------------------------

    def _state_dirs(self) -> list[str]:
        """Checkpoint subdirectories of the plugins that save state (registry key, `:` as `_`)."""
        return [k.replace(":", "_") for k in self.registry.keys() if self.registry.implements(k, "save_state")]

    def _choose_checkpoint(self) -> Path | None:
        """The newest complete checkpoint: every selected plugin that saves state has its state in it (a tracker
        or extra added since the checkpoint was written starts fresh, so theirs are not required)."""
        required = [d for d in self._state_dirs() if not d.startswith(("extra_", "tracker_"))] + ["core"]
        ckpt, self.skipped = self.checkpoints.newest_complete(required)
        if ckpt is None and self.skipped:
            reasons = "; ".join(f"{p.name}: {why}" for p, why in self.skipped)
            raise CheckpointError(f"{self.checkpoints.root} holds no complete checkpoint to resume from ({reasons}); "
                                  f"start the run over with `rlcore run --run-dir {self.run_dir} --overwrite ...`")
        return ckpt

    def setup(self, resume: bool = False) -> None:
        """Settle `auto` options as `rlcore run` does (a no-op for a config it settled), seed, resolve the model, set
        every plugin up, and restore the newest complete checkpoint if resuming."""
        self.cfg = preflight.settle(self.cfg, models.read_config(self.cfg.trainer.model))  # as `rlcore run` does
        t = self.cfg.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self._choose_checkpoint() if resume else None
        ctx = make_context(self.cfg, self.registry, self.run_dir, resumed=ckpt is not None)
        if t.keep_freed_memory and ctx.hardware.device().type == "cpu":
            host_memory.keep_freed_memory()
        preflight.check_run(self.cfg, models.read_config(ctx.model.path))
        fit = prompt_fit(ctx, self.cfg.sampling.max_new_tokens)  # before any worker starts: max_new_tokens fits
        for key in self.registry.keys():
            self.registry.call(key, "setup", ctx=ctx)
        self.loss: PolicyLoss = self.registry.require("algo", "policy_loss")
        if t.max_staleness and getattr(self.loss, "tis_cap", 0) is None:
            log.warning("trainer.max_staleness=%d without algo.tis_cap: stale samples are trained on as if the "
                        "current policy had sampled them, which slows learning (README: Asynchronous RL); "
                        "set algo.tis_cap=2 to correct for the policy that sampled them", t.max_staleness)
        self.turns = turn_inputs(self.registry)
        if fit is not None:
            fit.use_tools(self.turns["tools"])
        train = self.registry.require("task", "dataset", split="train")
        admit = None
        if fit is not None and isinstance(train, (list, tuple)):
            train = fit.check(train, "train split", drop=t.filter_overlong_prompts)
        elif fit is not None:
            admit = self._admitter(fit)
        self.stream = PromptStream(train, seed=t.seed, admit=admit)
        if t.eval_every:
            test = self.registry.require("task", "dataset", split="test")
            self.eval_prompts: Sequence[Prompt] = [test[i] for i in range(min(t.eval_limit, len(test)))]
            if fit is not None:
                self.eval_prompts = fit.check(self.eval_prompts, "test split (trainer.eval_every)",
                                              drop=t.filter_overlong_prompts)
        if ckpt is not None:
            self._restore(ckpt)
            for path, _ in self.skipped:
                shutil.rmtree(path, ignore_errors=True)  # newer than the resumed step, so retraining replaces them
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_until=self.step if resume else None)
        self.generations = GenerationLog(self.run_dir, self.hook, t.generations_every, t.generations_samples,
                                         keep_until=self.step if resume else None)
        weights = self.contract.policy_weights(self.hook.policy_weights())
        if t.max_staleness:
            weights = self.rollout_weights = weights.snapshot()  # the pipeline's version `self.step`
        self.hook.sync_weights(weights=weights)
        if ckpt is not None:
            load_rng(ckpt / "core" / "rng.pkl")

    def _admitter(self, fit: PromptFit) -> Any:
        """Check each prompt of a generated train split as it is drawn: skip or stop on one that does not fit."""
        drop = self.cfg.trainer.filter_overlong_prompts

        def admit(prompt: Prompt) -> bool:
            ok, n = fit.fits(prompt)
            if not ok and not drop:
                raise fit.error(prompt, n or 0, f"step {self.step + 1}, train split")
            return ok
        return admit

    # ---- one step ---------------------------------------------------------------------------------

    def _keep(self, batch: RolloutBatch) -> torch.Tensor | None:
        """AND of every plugin's `keep_groups` verdict, or None when no plugin filters."""
        verdicts = [v for v in self.hook.keep_groups(batch=batch) if v is not None]
        if not verdicts:
            return None
        keep = torch.ones(int(batch.group_ids.max()) + 1, dtype=torch.bool)
        for v in verdicts:
            keep &= torch.as_tensor(v, dtype=torch.bool)
        return keep

    def _collect(self, step: int) -> Collected:
        """Sample and score prompts for the step after `step` until `prompts_per_step` groups survive the
        filters (or rounds run out). Asynchronous runs seed each round's sampling from (seed, step, round),
        so a batch does not depend on when the rollout thread sampled it."""
        t = self.cfg.trainer
        timings: dict[str, float] = {}
        parts: list[RolloutBatch] = []
        groups, rounds, dropped = 0, 0, 0
        rewards, lengths, truncated, gen_tokens = [], [], [], 0
        infos: list[dict[str, float]] = []
        rollout_infos: list[dict[str, Any]] = []
        while True:
            prompts = self.stream.take(t.prompts_per_step - groups)
            params = self.cfg.sampling.params(seed=batch_seed(t.seed, step, rounds) if t.max_staleness else None)
            t0 = time.perf_counter()
            batch = self.contract.sample(self.registry.require("rollout", "sample", prompts=prompts, params=params,
                                                               **self.turns), prompts, params.n)
            timings["timing/sample"] = timings.get("timing/sample", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = self.contract.score(self.registry.require("task", "score", batch=batch), batch)
            timings["timing/score"] = timings.get("timing/score", 0.0) + time.perf_counter() - t0
            batch.rewards = scores.rewards.float()
            check_finite(batch.rewards, batch.prompts, self.cfg.selection["task"], f"step {step + 1}")
            rollout_infos += batch.info or []
            infos += scores.info or []
            batch.info = [{**a, **b} for a, b in zip(batch.info or [{}] * len(batch), scores.info or [{}] * len(batch))]
            rewards += batch.rewards.tolist()
            lengths += batch.response_lengths.tolist()
            truncated += batch.truncated.float().tolist()
            gen_tokens += int(batch.response_mask.sum())
            keep = self._keep(batch)
            if keep is not None:
                dropped += int((~keep).sum())
                batch = batch.select([i for i, g in enumerate(batch.group_ids.tolist()) if keep[g]])
            if len(batch):
                parts.append(batch)
                groups += batch.num_groups
            if keep is None or groups >= t.prompts_per_step:
                break
            if rounds >= t.max_resample_rounds:
                if not self.warned_fill:
                    log.warning("dynamic sampling: only %d of %d groups kept after %d extra sampling rounds; "
                                "training on a smaller batch. Raise trainer.max_resample_rounds or make the "
                                "task easier/harder so fewer groups have equal rewards.",
                                groups, t.prompts_per_step, rounds)
                    self.warned_fill = True
                break
            rounds += 1
        r = torch.tensor(rewards)
        stats = {
            "reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0,
            "reward/max": float(r.max()), "reward/min": float(r.min()),
            "response_length/mean": _mean(lengths), "response_length/max": float(max(lengths)),
            "response_length/clip_ratio": _mean(truncated),
            "filter/groups_dropped": float(dropped), "filter/extra_rounds": float(rounds),
            "rollout/tokens": float(gen_tokens),
            "rollout/tokens_per_s": gen_tokens / max(timings["timing/sample"], 1e-9),
        }
        stats.update(_numeric_means(infos, "score/"))
        stats.update(_numeric_means(rollout_infos, "rollout/"))
        batch = RolloutBatch.concat(parts) if parts else None
        if batch is not None:
            stats["batch/groups"] = float(batch.num_groups)
        return Collected(step=step, batch=batch, metrics={**stats, **timings}, version=step)

    def _take(self) -> Collected:
        """This step's batch: sampled now (synchronous), or taken from the rollout thread, with how stale it
        is (every sample's `policy_version` in its info) and how long each side waited."""
        if self.pipeline is None:
            return self._collect(self.step)
        collected, waited = self.pipeline.take(self.step)
        for info in collected.batch.info if collected.batch is not None else ():
            info["policy_version"] = collected.version
        staleness = float(self.step - collected.version)  # one version samples a whole batch: mean = max
        collected.metrics.update({"async/staleness_mean": staleness, "async/staleness_max": staleness,
                                  "async/trainer_wait_s": waited,
                                  "async/rollout_wait_s": self.pipeline.rollout_wait_seconds()})
        return collected

    def _push_weights(self) -> dict[str, float]:
        """Synchronous: load the updated weights into the rollout now. Asynchronous: publish a snapshot of
        them as policy version `step + 1` for the rollout thread to load when a batch needs it."""
        weights = self.contract.policy_weights(self.hook.policy_weights())
        if self.pipeline is None:
            return self.hook.sync_weights(weights=weights) or {}
        self.pipeline.publish(self.step + 1, weights.snapshot())
        return {}

    def _warn_on_mismatch(self, metrics: dict[str, Any]) -> None:
        """Warn once when the rollout sampled from a policy measurably other than the trainer's and the loss could
        correct for it (`algo.tis_cap`) but does not."""
        gap = metrics.get("mismatch/abs_diff_mean")
        can_correct = getattr(self.loss, "tis_cap", 0) is None
        if self.warned_mismatch or not can_correct or gap is None or gap <= MISMATCH_WARNING_NATS:
            return
        self.warned_mismatch = True
        log.warning("step %d: the rollout's logprobs differ from the trainer's by %.2g nats per token (mean; "
                    "max %.2g): the two sides compute in different precisions or kernels, so the update trains on "
                    "samples of another policy; set algo.tis_cap=2 to correct for it, or compute both in float32 "
                    "or bfloat16_matched (README: Precision)", self.step + 1, gap, metrics["mismatch/abs_diff_max"])

    def train_step(self) -> dict[str, Any]:
        """Run one step and return its metrics row."""
        t_step = time.perf_counter()
        timings: dict[str, float] = {}
        collected = self._take()
        batch, metrics = collected.batch, collected.metrics
        self._check_reward_errors(metrics)
        if batch is not None:
            t0 = time.perf_counter()
            if self.loss.needs_ref_logprobs:
                batch.ref_logprobs = self.contract.logprobs(
                    self.registry.require("backend", "logprobs", batch=batch, reference=True), batch, reference=True)
            plan = UpdatePlan(epochs=self.cfg.trainer.epochs, mini_batches=self.cfg.trainer.mini_batches,
                              max_response_length=self.cfg.sampling.max_new_tokens)
            if plan.epochs * plan.mini_batches > 1:  # off-policy: the old policy's logprobs, before any step
                batch.old_logprobs = self.contract.logprobs(
                    self.registry.require("backend", "logprobs", batch=batch, reference=False), batch, reference=False)
                metrics.update(logprob_mismatch(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask))
            timings["timing/logprobs"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            batch.advantages = self.contract.advantage(self.registry.require("algo", "advantage", batch=batch), batch)
            adv = batch.advantages
            metrics["advantage/mean"] = _masked_mean(adv, batch.response_mask)
            metrics["advantage/std"] = math.sqrt(max(_masked_mean(adv**2, batch.response_mask) - metrics["advantage/mean"] ** 2, 0.0))
            timings["timing/advantage"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            # on-policy, the update's own forward measures the mismatch (see `on_policy_mismatch`)
            metrics.update(finish_mismatch(self.contract.update(self.registry.require(
                "backend", "update", batch=batch, loss=self.loss, plan=plan))))
            self._warn_on_mismatch(metrics)
            if not self.cfg.trainer.log_mismatch:
                metrics = {name: value for name, value in metrics.items() if not name.startswith("mismatch/")}
            timings["timing/update"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics.update(self._push_weights())
            timings["timing/sync"] = time.perf_counter() - t0
        else:
            log.warning("step %d: every group was filtered out; no update this step", self.step + 1)
            if self.pipeline is not None:
                self._push_weights()  # the same weights, as the version later batches wait for
        for extra in self.hook.step_metrics():
            metrics.update(extra or {})
        loss = metrics.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise TrainingError(f"step {self.step + 1}: loss is {loss}; lower backend.lr, check the rewards "
                                "for NaN, or try backend.dtype=float32")
        timings["timing/step"] = time.perf_counter() - t_step
        metrics.update(timings)
        metrics["tokens_per_s"] = metrics["rollout/tokens"] / timings["timing/step"]
        self.generations.train(self.step + 1, batch)
        return metrics

    def _check_reward_errors(self, metrics: dict[str, Any]) -> None:
        """Stop when the reward function raised on every sample for `max_reward_error_steps` steps in a row."""
        limit = self.cfg.trainer.max_reward_error_steps
        self.error_steps = self.error_steps + 1 if metrics.get("score/reward_error") == 1.0 else 0
        if limit and self.error_steps >= limit:
            raise TrainingError(
                f"step {self.step + 1}: task {self.cfg.selection['task']!r}: its reward function raised on every "
                f"sample for {self.error_steps} steps in a row (the first error of each step is in the warnings "
                "above), so nothing can be learned; fix the reward function, or raise trainer.max_reward_error_steps "
                "(0: never stop)")

    def validate(self) -> dict[str, float]:
        """pass@1 and mean reward on the first `eval_limit` test problems."""
        t = self.cfg.trainer
        params = attrs.evolve(self.cfg.sampling.params(), n=t.eval_samples, temperature=t.eval_temperature)
        result = evaluate(self.registry, self.eval_prompts, params, ks=[1],
                          on_batch=self.generations.evaluation(self.step))
        return {"eval/pass@1": result.pass_at["pass@1"], "eval/reward": result.reward_mean,
                "eval/reward_errors": float(result.reward_errors), "timing/eval": result.seconds}

    def _evaluate(self) -> dict[str, float]:
        """`validate` on the current weights; an asynchronous run holds its rollout thread meanwhile, loads
        the current weights into the engine for the evaluation and gives the thread its version back."""
        if self.pipeline is None:
            return self.validate()
        with self.pipeline.paused():
            self.hook.sync_weights(weights=self.hook.policy_weights().snapshot())
            try:
                return self.validate()
            finally:
                self.hook.sync_weights(weights=self.pipeline.weights)

    # ---- checkpoints ------------------------------------------------------------------------------

    def _write_checkpoint(self, directory: Path) -> list[str]:
        """Every stateful plugin's state in its own subdirectory, then the loop's (`core/`); the names written."""
        written = []
        for key in self.registry.keys():
            if not self.registry.implements(key, "save_state"):
                continue
            sub = directory / key.replace(":", "_")
            sub.mkdir()
            self.registry.call(key, "save_state", directory=sub)
            written.append(sub.name)
        core = directory / "core"
        core.mkdir()
        state = {"step": self.step, "stream": self.stream.state(), "rewards": self.rewards}
        (core / "trainer_state.json").write_text(json.dumps(state))
        save_rng(core / "rng.pkl")
        if self.pipeline is not None:
            torch.save([attrs.asdict(c, recurse=False) for c in self.pipeline.queued()], core / QUEUE_FILE)
        return [*written, "core"]

    def save(self) -> Path:
        """A checkpoint at this step. An asynchronous run first lets its rollout thread sample every batch the
        published weights allow (the next k + 1), then holds it: the checkpoint stores those batches and the
        prompt stream after them, so a resume needs no policy version older than this step's."""
        if self.pipeline is None:
            return self.checkpoints.save(self.step, self._write_checkpoint)
        with self.pipeline.paused(drain_until=self.step + self.cfg.trainer.max_staleness):
            return self.checkpoints.save(self.step, self._write_checkpoint)

    def _restore(self, ckpt: Path) -> None:
        """Load a verified checkpoint into every plugin (a tracker or extra added since it was saved starts fresh)."""
        for key in self.registry.keys():
            sub = ckpt / key.replace(":", "_")
            if sub.is_dir():
                self.registry.call(key, "load_state", directory=sub)
            elif self.registry.implements(key, "save_state"):
                log.warning("%s has no state for %s (added since it was saved): it starts fresh", ckpt, key)
        state = json.loads((ckpt / "core" / "trainer_state.json").read_text())
        self.step = int(state["step"])
        self.stream.load(state["stream"])
        self.rewards = [float(r) for r in state["rewards"]]
        queue = ckpt / "core" / QUEUE_FILE
        if queue.exists():
            self.queued = [Collected(**c) for c in torch.load(queue, weights_only=False)]  # our own checkpoint
        self.resumed_from = ckpt

    # ---- the run ----------------------------------------------------------------------------------

    def run(self, stop: GracefulStop | None = None) -> Summary:
        """Train until `trainer.steps`, checkpointing every `save_every` steps and at the end. When `stop`
        reports a signal, the step under way finishes, a checkpoint is written at that step and the run
        returns early with `stopped_by` set (and no summary.json)."""
        t = self.cfg.trainer
        started = time.perf_counter()
        display = ProgressDisplay(t.steps, self.step, t.log_every) if self.show_progress else None
        last_ckpt = self.resumed_from
        if stop is not None:
            stop.arm()
        if t.max_staleness and self.step < t.steps:
            self._start_pipeline()
        try:
            while self.step < t.steps:
                if stop is not None and stop.requested:
                    break
                self.working_on = self.step + 1
                metrics = self.train_step()
                self.step += 1
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    metrics.update(self._evaluate())
                self.rewards.append(metrics["reward/mean"])
                row = {"step": self.step, **metrics}
                self.metrics.write(row)
                self.hook.log_metrics(step=self.step, metrics=row)
                if display is not None:
                    display.update(self.step, row)
                if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                    last_ckpt = self.save()
                self.working_on = None
            if stop is not None and stop.requested and self.step < t.steps:
                self.stopped_by = stop.name
                if self.step > 0 and (last_ckpt is None or last_ckpt.name != f"step_{self.step:06d}"):
                    last_ckpt = self.save()
        finally:
            if display is not None:
                display.close()
            self._stop_pipeline()
        k = min(10, max(1, len(self.rewards) // 2))
        summary = Summary(run_dir=str(self.run_dir), steps=self.step, reward_start=_mean(self.rewards[:k]),
                          reward_end=_mean(self.rewards[-k:]), seconds=time.perf_counter() - started,
                          last_checkpoint=str(last_ckpt) if last_ckpt else None)
        if self.stopped_by is None:
            (self.run_dir / "summary.json").write_text(json.dumps(attrs.asdict(summary), indent=2))
        return summary

    def _start_pipeline(self) -> None:
        """Start the rollout thread at this step: batches a checkpoint sampled ahead first, then step
        `step + len(queued)` onwards, from the snapshot the engine was loaded with in `setup`."""
        assert self.rollout_weights is not None, "setup loads a snapshot into the rollout first"
        queued = [c for c in self.queued if c.step >= self.step]
        self.pipeline = RolloutPipeline(
            self._collect, lambda weights: self.hook.sync_weights(weights=weights), self.cfg.trainer.max_staleness,
            next_step=self.step + len(queued), end_step=self.cfg.trainer.steps, version=self.step,
            weights=self.rollout_weights, queued=queued)
        self.queued = []
        self.pipeline.start()

    def _stop_pipeline(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None

    def close(self) -> None:
        """Tear every plugin down (engines, processes), once; safe to call after an error."""
        self._stop_pipeline()
        if not self.closed:
            self.closed = True
            self.hook.teardown()
