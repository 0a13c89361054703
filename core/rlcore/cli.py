"""The `rlcore` command: run, warmstart, plugins, report, eval, export, convert."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import rlcore
from rlcore import plugins
from rlcore.config import load_file, merge, parse_overrides
from rlcore.errors import RLCoreError, RunDirError, StopNow, user_message
from rlcore.stopping import exit_status

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


DEBUG = "rlcore.debug"
"""Where `--debug` is recorded in click's context (`RLCORE_DEBUG=1` in the environment does the same)."""


class _Failure(click.ClickException):
    """A one-line `Error: <message>` without a traceback: exit status 2 for the user's mistakes (an
    RLCoreError), 1 for the machine's state (a DiskError, or an OSError such as a full or read-only disk)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _debug_requested() -> bool:
    ctx = click.get_current_context(silent=True)
    return os.environ.get("RLCORE_DEBUG", "") not in ("", "0") or bool(ctx is not None and ctx.meta.get(DEBUG))


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[DEBUG] = True


_debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                             help="Show the Python traceback of an error instead of one line (also RLCORE_DEBUG=1).")


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every command's error handling: an exception that `rlcore.errors.user_message` words (the user's
    mistake, a full or read-only disk) or that a plugin's hook raised (`plugins.hook_failure`) is printed as
    one `Error:` line without a traceback unless `--debug`; a second SIGTERM / SIGINT exits with 128 + its
    number; anything else is a bug and keeps its traceback. Adds the command's own `--debug` flag."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StopNow as e:
            raise click.exceptions.Exit(exit_status(e.signum)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(exit_status(signal.SIGINT)) from None
        except Exception as e:
            message = user_message(e) or plugins.hook_failure(e)
            if message is None or _debug_requested():
                raise
            raise _Failure(message, e.exit_code if isinstance(e, RLCoreError) else 1) from None
    return _debug_option(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(rlcore.__version__, prog_name="rlcore")
@_debug_option
def main() -> None:
    """rlcore: reinforcement learning for LLM post-training, a tiny core loop plus plugins."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _plugin_option(kind: str, flag: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(flag, kind, default=None, metavar="NAME",
                        help=f"{kind} plugin (installed: {', '.join(plugins.available(kind)) or 'none'}).")


def _resolve(saved: dict[str, Any] | None, config_file: Path | None, selection: dict[str, str | None],
             trainer: dict[str, Any], overrides: tuple[str, ...]) -> Any:
    """Build the run's config: the saved config of a run directory, then --config, flags, --set."""
    from rlcore.run_config import resolve

    raw: dict[str, Any] = dict(saved or {})
    if config_file is not None:
        raw = merge(raw, load_file(config_file))
    flags = {"plugins": {k: v for k, v in selection.items() if v is not None},
             "trainer": {k: v for k, v in trainer.items() if v is not None}}
    return resolve(merge(merge(raw, flags), parse_overrides(list(overrides))))


def _finite_float(low: float) -> click.ParamType:
    """A float option that must be finite and at least `low` (click's FloatRange lets NaN through)."""
    class FiniteFloat(click.ParamType):
        name = "float"

        def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
            number = click.FLOAT.convert(value, param, ctx)
            if not math.isfinite(number) or number < low:
                self.fail(f"{value!r} must be a finite number >= {low:g}", param, ctx)
            return number
    return FiniteFloat()


@main.command()
@_plugin_option("algo", "--algo")
@_plugin_option("backend", "--backend")
@_plugin_option("rollout", "--rollout")
@_plugin_option("task", "--task")
@click.option("--hardware", default=None, metavar="NAME", help="hardware plugin, or auto (default).")
@click.option("--model", default=None, help="Model directory, .gguf file or hub id (default: the embedded tiny model).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML or TOML config file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one option, e.g. --set algo.clip_high=0.28 (repeatable).")
@click.option("--steps", type=int, default=None, help="Shortcut for --set trainer.steps=N.")
@click.option("--seed", type=int, default=None, help="Shortcut for --set trainer.seed=N.")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Where config.yaml, metrics.jsonl, checkpoints and summary.json go (default: "
                   "runs/<time>-<algo>-<task>); it must not hold another run.")
@click.option("--resume", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Continue the run in this directory from its newest complete checkpoint, with its saved config "
                   "(options that change what the run is are refused).")
@click.option("--overwrite", is_flag=True,
              help="Start a new run in a --run-dir that holds one, deleting its config, metrics, checkpoints and "
                   "built model.")
@click.option("--dry-run", is_flag=True, help="Resolve plugins and options, print the config, and exit.")
@click.option("--trace", is_flag=True, help="Print every hook call and result (pluggy tracing) to stderr.")
@_user_errors
def run(algo: str | None, backend: str | None, rollout: str | None, task: str | None, hardware: str | None,
        model: str | None, config_file: Path | None, overrides: tuple[str, ...], steps: int | None,
        seed: int | None, run_dir: Path | None, resume: Path | None, overwrite: bool, dry_run: bool,
        trace: bool) -> None:
    """Train a policy with RL. With no options: GRPO teaches an embedded tiny model arithmetic on this CPU.

    Options resolve in this order, later wins: plugin defaults, the saved config of --resume,
    --config, the flags above, --set. SIGTERM or Ctrl-C finishes the step under way, saves a checkpoint
    and exits with 143 / 130; a second one exits at once.
    """
    from rlcore import resume as resuming
    from rlcore.rundir import check_is_directory, load_saved_config

    saved = None
    if resume is not None:
        if run_dir is not None and run_dir.resolve() != resume.resolve():
            raise RunDirError(f"--resume {resume} continues that run in its own directory, so --run-dir {run_dir} "
                              "would be ignored: drop --run-dir, or start a new run there without --resume")
        if overwrite:
            raise RunDirError("--overwrite starts a new run and --resume continues one: pass only one of them")
        run_dir = resume
        saved = load_saved_config(resume, "--resume")
    from rlcore import preflight
    from rlcore.models import read_config

    cfg = _resolve(saved, config_file, dict(algo=algo, backend=backend, rollout=rollout, task=task, hardware=hardware),
                   dict(model=model, steps=steps, seed=seed), overrides)
    model_config = read_config(cfg.trainer.model)
    cfg = preflight.settle(cfg, model_config)  # config.yaml and the dry run show what `auto` options stand for
    changes = resuming.changes(saved, cfg, resume) if saved is not None and resume is not None else []
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        import yaml

        click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)
        preflight.check_run(cfg, model_config)
        seen = (f"model config {type(model_config).__name__} read" if model_config is not None else
                f"model config of {cfg.trainer.model!r} not readable here, so the model checks were skipped")
        click.echo(f"dry run: plugins resolved and instantiated, hooks match the contract, options valid, and every "
                   f"plugin accepts this run ({seen}).")
        return
    if run_dir is None:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # a timestamped name could differ between ranks
            raise click.UsageError("under torchrun pass --run-dir: every rank must use the same run directory")
        run_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.selection['algo']}-{cfg.selection['task']}"
    check_is_directory(run_dir)
    from rlcore.run_session import train

    train(cfg, run_dir, resume=resume is not None, changes=changes, overwrite=overwrite, trace=trace)


@main.command()
@_plugin_option("backend", "--backend")
@_plugin_option("task", "--task")
@click.option("--hardware", default=None, metavar="NAME", help="hardware plugin, or auto (default).")
@click.option("--model", default=None, help="The model to fine-tune (default: trainer.model, else the embedded tiny model).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML or TOML config file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one option.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Directory for the warm-started model (OUT/model), config.yaml, metrics.jsonl, warmstart.json.")
@click.option("--steps", type=int, default=200, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Demonstrations per step.")
@click.option("--lr", type=float, default=None, help="Learning rate (sets backend.lr for this command).")
@click.option("--seed", type=int, default=None, help="Shortcut for --set trainer.seed=N.")
@_user_errors
def warmstart(backend: str | None, task: str | None, hardware: str | None, model: str | None,
              config_file: Path | None, overrides: tuple[str, ...], out: Path, steps: int, batch_size: int,
              lr: float | None, seed: int | None) -> None:
    """Supervised warm start before RL: fine-tune on the task's demonstrations (assistant turns only).

    Takes the same config as `rlcore run` (its backend, task, model and seed); writes OUT/model, which
    `rlcore run --model OUT/model` trains on. E.g. a tiny model learns the syntax of a tool call here and,
    with RL, when calling the tool pays.
    """
    import json

    import attrs
    import yaml

    from rlcore.loop import make_context, open_registry
    from rlcore.warmstart import warm_start

    if steps < 1 or batch_size < 1:
        raise RLCoreError(f"--steps ({steps}) and --batch-size ({batch_size}) must be at least 1")
    if lr is not None:
        overrides = (*overrides, f"backend.lr={lr}")
    # one optimizer step per warm-start step: an LR schedule (backend.lr_scheduler_type) spans the warm start
    overrides = (*overrides, f"trainer.steps={steps}", "trainer.epochs=1", "trainer.mini_batches=1")
    cfg = _resolve(None, config_file, dict(backend=backend, task=task, hardware=hardware),
                   dict(model=model, seed=seed), overrides)
    if (out / "model").exists():
        raise RLCoreError(f"{out / 'model'} exists already: pass another --out (a warm start never overwrites one)")
    out.mkdir(parents=True, exist_ok=True)
    record = {**cfg.to_dict(), "warmstart": {"steps": steps, "batch_size": batch_size}}
    (out / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    registry = open_registry(cfg, ("hardware", "backend", "task"))
    ctx = make_context(cfg, registry, out / "base")
    try:
        for key in registry.keys():
            registry.call(key, "setup", ctx=ctx)
        result = warm_start(registry, ctx, out, steps, batch_size, echo=click.echo)
    finally:
        registry.hook.teardown()
    (out / "warmstart.json").write_text(json.dumps(attrs.asdict(result), indent=2) + "\n")
    click.echo(f"nll {result.nll_start:.3f} -> {result.nll_end:.3f} over {steps} steps in {result.seconds:.0f} s")
    click.echo(f"wrote {result.model}; next: rlcore run --model {result.model} ...")


@main.command(name="plugins")
@click.argument("kind", required=False)
@click.argument("name", required=False)
@click.option("--markdown", is_flag=True, help="Print the options as a markdown table (the README's).")
@_user_errors
def plugins_cmd(kind: str | None, name: str | None, markdown: bool) -> None:
    """List installed plugins: kind, name, distribution, version, status. With KIND NAME (or `trainer`,
    `sampling`): that plugin's (section's) options, with type, default and docstring."""
    if kind is not None:
        from rlcore.option_docs import as_markdown, as_text, describe_options, options_of

        section, cls = options_of(kind, name)
        options = describe_options(cls)
        click.echo(as_markdown(options) if markdown else as_text(section, options), nl=not markdown)
        return
    rows = [(p.kind, p.name, p.distribution, p.version,
             "disabled" if p.disabled else f"error: {p.error}" if p.error else "ok") for p in plugins.describe_all()]
    header = ("KIND", "NAME", "DISTRIBUTION", "VERSION", "STATUS")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    for warning in plugins.unknown_groups():
        click.echo(f"warning: {warning}", err=True)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="HTML path (default RUN_DIR/report.html for one run, ./rlcore-report.html for several).")
@_user_errors
def report(run_dirs: tuple[Path, ...], out: Path | None) -> None:
    """Write one self-contained HTML page of a run (curves, summary, generation tables, config), or of several
    runs compared, and each run's curves to RUN_DIR/report.png."""
    import importlib.util

    from rlcore.report import draw
    from rlcore.report_page import write

    page = out or (run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("rlcore-report.html"))
    click.echo(f"wrote {write(run_dirs, page)}")
    if importlib.util.find_spec("matplotlib") is None:
        click.echo("report.png skipped: matplotlib is not installed (pip install 'rlcore[report]')")
        return
    for run_dir in run_dirs:
        click.echo(f"wrote {draw(run_dir)}")


@main.command(name="eval")
@_plugin_option("rollout", "--rollout")
@_plugin_option("task", "--task")
@click.option("--hardware", default=None, metavar="NAME", help="hardware plugin, or auto (default).")
@click.option("--model", default=None, help="Model directory, .gguf file or hub id.")
@click.option("--run-dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Evaluate this run's latest checkpoint, with its saved config.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML or TOML config file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one option.")
@click.option("--split", default="test", show_default=True, help="Dataset split to evaluate on.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N problems.")
@click.option("--samples", "-n", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per problem.")
@click.option("--k", "ks", default="1", show_default=True, help="Comma-separated k values for pass@k (each <= samples).")
@click.option("--temperature", type=_finite_float(0.0), default=None,
              help="Sampling temperature (default: 0 for one sample, else sampling.temperature).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the result as JSON here (its directory must exist).")
@_user_errors
def eval_cmd(rollout: str | None, task: str | None, hardware: str | None, model: str | None, run_dir: Path | None,
             config_file: Path | None, overrides: tuple[str, ...], split: str, limit: int | None, samples: int,
             ks: str, temperature: float | None, out: Path | None) -> None:
    """Evaluate a model (or a run's newest complete checkpoint) on a task split: pass@k and mean reward."""
    import json
    import tempfile

    import attrs

    from rlcore.evaluate import evaluate
    from rlcore.loop import make_context, open_registry
    from rlcore.prompt_fit import prompt_fit
    from rlcore.rundir import load_saved_config

    try:
        k_values = sorted({int(k) for k in ks.split(",") if k.strip()})
    except ValueError:
        raise RLCoreError(f"--k {ks!r}: expected comma-separated integers such as 1,4,8") from None
    if not k_values or max(k_values) > samples or min(k_values) < 1:
        raise RLCoreError(f"--k {ks!r}: each k must be between 1 and --samples ({samples}); raise --samples")
    if out is not None and not out.parent.is_dir():
        raise RLCoreError(f"--out {out}: directory {out.parent} does not exist; create it or write elsewhere")
    saved = load_saved_config(run_dir, "--run-dir") if run_dir is not None else None
    cfg = _resolve(saved, config_file, dict(rollout=rollout, task=task, hardware=hardware), dict(model=model), overrides)
    with tempfile.TemporaryDirectory(prefix="rlcore-eval-") as tmp:
        work = Path(tmp)
        if run_dir is not None and model is None:
            model = str(_export_latest(cfg, run_dir, work / "model"))
        registry = open_registry(cfg, ("hardware", "rollout", "task"))
        ctx = make_context(cfg, registry, run_dir or work, model=model)
        try:
            for key in registry.keys():
                registry.call(key, "setup", ctx=ctx)
            data = registry.require("task", "dataset", split=split)
            prompts = [data[i] for i in range(min(limit or len(data), len(data)))]
            fit = prompt_fit(ctx, cfg.sampling.max_new_tokens)
            if fit is not None:
                fit.use_tools([tool for tools in registry.hook.tools() for tool in (tools or [])])
                prompts = list(fit.check(prompts, f"{split} split", drop=cfg.trainer.filter_overlong_prompts))
            temp = temperature if temperature is not None else (0.0 if samples == 1 else cfg.sampling.temperature)
            params = attrs.evolve(cfg.sampling.params(), n=samples, temperature=temp)
            result = evaluate(registry, prompts, params, k_values, progress=True)
        finally:
            registry.hook.teardown()
    result.split = split
    text = json.dumps(attrs.asdict(result), indent=2)
    click.echo(text)
    if out is not None:
        out.write_text(text + "\n")


def _export_latest(cfg: Any, run_dir: Path, out: Path) -> Path:
    """Export the newest complete checkpoint of `run_dir` as a transformers directory through the backend's hook."""
    from rlcore.checkpoint import Checkpoints
    from rlcore.loop import make_context, open_registry

    registry = open_registry(cfg, ("hardware", "backend"))
    required = ["backend", "core"] if registry.implements("backend", "save_state") else ["core"]
    ckpt, skipped = Checkpoints(run_dir / "checkpoints").newest_complete(required)
    for path, why in skipped:
        click.echo(f"skipped incomplete checkpoint {path.name} ({why})", err=True)
    if ckpt is None:
        raise RLCoreError(f"{run_dir} has no complete checkpoint (checkpoints/step_*): train at least to the first "
                          "save (trainer.save_every) or pass --model")
    ctx = make_context(cfg, registry, run_dir)
    return registry.require("backend", "export_model", checkpoint=ckpt / "backend", out=out, ctx=ctx)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New directory to write the model to.")
@_user_errors
def export(run_dir: Path, out: Path) -> None:
    """Write a run's newest complete checkpoint as a transformers model directory (LoRA merged)."""
    from rlcore.rundir import load_saved_config

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RLCoreError(f"--out {out} already exists{' as a file' if not out.is_dir() else ' and is not empty'}: "
                          "name a new directory (the model's files would mix with what is there)")
    cfg = _resolve(load_saved_config(run_dir, "RUN_DIR"), None, {}, {}, ())
    click.echo(f"wrote {_export_latest(cfg, run_dir, out)}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--backend", required=True, metavar="NAME", help="The backend whose native format to convert to or from.")
@click.option("--to", type=click.Choice(["native", "hf"]), required=True,
              help="native: Hugging Face directory -> the backend's format; hf: the reverse.")
@click.option("--model", default=None, help="The Hugging Face model (config and tokenizer) the weights belong to "
              "(default: SOURCE when converting to native).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Backend options, e.g. backend.tp=2.")
@_user_errors
def convert(source: Path, out: Path, backend: str, to: str, model: str | None, overrides: tuple[str, ...]) -> None:
    """Convert model weights between the Hugging Face layout and a backend's own (e.g. Megatron)."""
    from rlcore.loop import make_context, open_registry

    model = model or (str(source) if to == "native" else None)
    if model is None:
        raise RLCoreError("--to hf needs --model: the Hugging Face model directory the weights belong to")
    cfg = _resolve(None, None, dict(backend=backend), dict(model=model), overrides)
    registry = open_registry(cfg, ("hardware", "backend"))
    ctx = make_context(cfg, registry, out.parent if out.parent.exists() else Path.cwd())
    result = registry.require("backend", "convert_checkpoint", source=source, out=out, to=to, ctx=ctx)
    click.echo(f"wrote {result}")
