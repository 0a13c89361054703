"""The core's own options and the resolution of a run's whole config from defaults, file and CLI."""

from __future__ import annotations

from typing import Any

import attrs

from rlcore import plugins
from rlcore.config import build_options, check_range, merge, options_to_dict
from rlcore.errors import ConfigError
from rlcore.types import SamplingParams

DEFAULT_PLUGINS = {"algo": "grpo", "backend": "torch", "rollout": "hf", "task": "arithmetic", "hardware": "auto",
                   "placement": "local"}


@attrs.define
class TrainerOptions:
    """The loop's options (section `trainer`)."""

    model: str = ""
    """Model directory, GGUF file or hub id; empty builds the embedded tiny model."""
    steps: int = attrs.field(default=250, validator=check_range(0))
    """Training steps (each samples, scores and updates once)."""
    seed: int = 0
    """Seeds Python's, torch's and the device's generators, the prompt order and the embedded model."""
    prompts_per_step: int = attrs.field(default=32, validator=check_range(1))
    """Prompts (groups) per step; each gets `sampling.n` responses."""
    epochs: int = attrs.field(default=1, validator=check_range(1))
    """PPO epochs over each batch."""
    mini_batches: int = attrs.field(default=1, validator=check_range(1))
    """Optimizer steps per epoch (the batch is split into this many mini-batches)."""
    save_every: int = attrs.field(default=50, validator=check_range(0))
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = attrs.field(default=2, validator=check_range(1))
    """Newest checkpoints kept on disk; older ones are deleted."""
    max_resample_rounds: int = attrs.field(default=4, validator=check_range(0))
    """Extra sampling rounds to refill groups dropped by `keep_groups` (dynamic sampling)."""
    log_mismatch: bool = True
    """Log how far the rollout engine's logprobs are from the trainer's before the update (`mismatch/*`).
    Free: on-policy runs (one epoch, one mini-batch) measure it in the update's own forward, off-policy
    runs in the old-logprobs pass they need anyway."""
    eval_every: int = attrs.field(default=0, validator=check_range(0))
    """Evaluate on the task's test split every N steps and at the end (0: never)."""
    eval_limit: int = attrs.field(default=64, validator=check_range(1))
    """Test problems per evaluation (the first N of the split)."""
    eval_samples: int = attrs.field(default=1, validator=check_range(1))
    """Samples per test problem during evaluation (pass@1 is averaged over them)."""
    eval_temperature: float = attrs.field(default=0.0, validator=check_range(0.0))
    """Sampling temperature of evaluation (0: greedy)."""
    log_every: int = attrs.field(default=10, validator=check_range(1))
    """Print a progress line every N steps when the output is not a terminal."""
    max_reward_error_steps: int = attrs.field(default=3, validator=check_range(0))
    """Stop the run when the task's reward function raised on every sample for this many steps in a row
    (0: never stop)."""
    filter_overlong_prompts: bool = False
    """Leave out prompts whose tokens plus `sampling.max_new_tokens` exceed the model's context (verl's
    `data.filter_overlong_prompts`) instead of stopping with an error naming the first."""
    log_to: list[str] = attrs.field(factory=list)
    """Experiment trackers this run records to (tracker plugins, e.g. [tensorboard, wandb]; `rlcore plugins`
    lists the installed ones); an installed tracker is never active unless listed here."""
    generations_every: int = attrs.field(default=10, validator=check_range(0))
    """Log a table of sampled generations every N steps and at each evaluation (0: never) to
    `generations.jsonl` and every tracker."""
    generations_samples: int = attrs.field(default=4, validator=check_range(1))
    """Samples per generation table, spread evenly over the step's batch."""
    keep_freed_memory: bool = True
    """On a CPU, keep the host memory the process frees for its next allocations (glibc's malloc: no fresh
    mapping per large tensor, the heap's free top given back only above 2 GiB), so that a step's large tensors
    do not pay their page faults again every step; the process's memory then stays near its peak, for the
    rest of the process. glibc Linux only."""
    max_staleness: int = attrs.field(default=0, validator=check_range(0))
    """Asynchronous RL: the batch of step j is sampled with the weights after step j - k (k = this) while the
    trainer trains earlier steps, so no sample is more than k policy versions old (0: synchronous, sample
    then train). The loss clips against the trainer's logprobs before each update; set `algo.tis_cap` to
    correct for the behaviour policy as well (AReaL's decoupled objective)."""


@attrs.define
class SamplingOptions:
    """How responses are sampled (section `sampling`), passed to the rollout's `sample` hook."""

    n: int = attrs.field(default=8, validator=check_range(1))
    """Responses sampled per prompt (the group size)."""
    temperature: float = attrs.field(default=1.0, validator=check_range(0.0))
    """Sampling temperature (0: greedy)."""
    top_p: float = attrs.field(default=1.0, validator=check_range(0.0, 1.0))
    """Nucleus sampling: sample from the smallest token set of this total probability (1: off)."""
    max_new_tokens: int = attrs.field(default=256, validator=check_range(1))
    """Response budget in tokens; a longer response is truncated (`response_length/clip_ratio`)."""
    min_new_tokens: int = attrs.field(default=0, validator=check_range(0))
    """Tokens sampled before an EOS or stop string may end a response (vLLM's `min_tokens`)."""
    stop: list[str] = attrs.field(factory=list)
    """Strings that end a response, besides the model's EOS."""

    @min_new_tokens.validator
    def _at_most_max(self, _attribute: attrs.Attribute, value: int) -> None:
        if value > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={value} exceeds max_new_tokens={self.max_new_tokens}; "
                             "lower min_new_tokens or raise max_new_tokens")

    def params(self, seed: int | None = None) -> SamplingParams:
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                              stop=list(self.stop), seed=seed)


@attrs.define
class ResolvedConfig:
    """The run's config: selected plugin classes and every section's typed options."""

    selection: dict[str, str]
    classes: dict[str, type]
    trainer: TrainerOptions
    sampling: SamplingOptions
    options: dict[str, Any]
    """Typed options per kind."""
    extras: dict[str, type]
    """Enabled extra plugins by name (an extra that fails to import is skipped with a warning)."""
    warnings: list[str] = attrs.field(factory=list)
    trackers: dict[str, type] = attrs.field(factory=dict)
    """Tracker plugins `trainer.log_to` selects, by name, in its order."""
    tracker_options: dict[str, Any] = attrs.field(factory=dict)
    """Typed options per selected tracker (section `tracker.<name>`)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data, loadable again with `--config` (the run directory's config.yaml)."""
        out: dict[str, Any] = {"plugins": dict(self.selection),
                               "trainer": options_to_dict(self.trainer),
                               "sampling": options_to_dict(self.sampling)}
        for kind, opts in self.options.items():
            out[kind] = options_to_dict(opts)
        if self.trackers:
            out["tracker"] = {name: options_to_dict(opts) for name, opts in self.tracker_options.items()}
        return out


KNOWN_SECTIONS = {"plugins", "trainer", "sampling", *plugins.SELECTED_KINDS, "tracker", "extra"}


EMBEDDED_PRESET: dict[str, dict[str, Any]] = {
    "backend": {"lr": 1e-3},
    "sampling": {"max_new_tokens": 4},
    "task": {"max_operand": 4},
}
"""What `rlcore run` uses with the embedded tiny model (no `--model`): a random 130K-parameter model
learns with a far larger learning rate, shorter answers and easier problems than suit a pretrained LLM. Applied only to keys
the user did not set and that the selected plugins declare."""


def _apply_preset(raw: dict[str, Any], classes: dict[str, type]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    owners = {"sampling": SamplingOptions, "trainer": TrainerOptions,
              **{k: plugins.options_class(c) for k, c in classes.items()}}
    for section, values in EMBEDDED_PRESET.items():
        declared = {f.name for f in attrs.fields(owners[section])} if section in owners else set()
        target = out.setdefault(section, {})
        for key, value in values.items():
            if key in declared and key not in target:
                target[key] = value
    return out


def resolve(raw: dict[str, Any]) -> ResolvedConfig:
    """Validate a raw config dict: select plugins, then build each section's typed options.

    Without `trainer.model` the run uses the embedded tiny model and `EMBEDDED_PRESET` fills in the
    options it needs.
    """
    unknown = sorted(set(raw) - KNOWN_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}; sections are: {', '.join(sorted(KNOWN_SECTIONS))}")
    selection = merge(DEFAULT_PLUGINS, raw.get("plugins") or {})
    bad = sorted(set(selection) - set(plugins.SELECTED_KINDS))
    if bad:
        raise ConfigError(f"plugins.{bad[0]}: unknown plugin kind; kinds are: {', '.join(plugins.SELECTED_KINDS)}")
    selection["hardware"] = plugins.select_hardware(str(selection["hardware"]))
    classes = {kind: plugins.load(kind, str(name)) for kind, name in selection.items()}
    if not (raw.get("trainer") or {}).get("model"):
        raw = _apply_preset(raw, classes)
    options = {kind: build_options(plugins.options_class(cls), raw.get(kind), kind) for kind, cls in classes.items()}
    extras, warnings = {}, []
    for name in plugins.available("extra"):
        try:
            extras[name] = plugins.load("extra", name)
        except Exception as e:  # noqa: BLE001 - a broken extra never breaks a run
            warnings.append(f"extra plugin {name!r} skipped: {e}")
    trainer = build_options(TrainerOptions, raw.get("trainer"), "trainer")
    trackers, tracker_options = _trackers(trainer.log_to, raw.get("tracker"), warnings)
    return ResolvedConfig(
        selection={k: str(v) for k, v in selection.items()}, classes=classes, trainer=trainer,
        sampling=build_options(SamplingOptions, raw.get("sampling"), "sampling"),
        options=options, extras=extras, warnings=warnings, trackers=trackers, tracker_options=tracker_options)


def _trackers(names: list[str], raw: Any, warnings: list[str]) -> tuple[dict[str, type], dict[str, Any]]:
    """Load the trackers `trainer.log_to` names and build their options from section `tracker.<name>`;
    options of a tracker the run does not select are dropped with a warning."""
    sections = raw or {}
    if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
        raise ConfigError("tracker: expected one mapping per tracker, e.g. tracker.wandb.project=NAME")
    if len(set(names)) != len(names):
        raise ConfigError(f"trainer.log_to={names}: a tracker is listed twice")
    classes = {name: plugins.load("tracker", name) for name in names}
    for name in sorted(set(sections) - set(classes)):
        warnings.append(f"tracker.{name} options ignored: {name!r} is not in trainer.log_to {names}")
    return classes, {name: build_options(plugins.options_class(cls), sections.get(name), f"tracker.{name}")
                     for name, cls in classes.items()}
