"""The `rlcore` command: run, plugins, report."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import rlcore
from rlcore import plugins
from rlcore.config import load_file, merge, parse_overrides
from rlcore.errors import RLCoreError

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print RLCoreError messages as a one-line CLI error (exit 2) instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RLCoreError as e:
            raise click.UsageError(str(e)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(rlcore.__version__, prog_name="rlcore")
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
              help="Where config.yaml, metrics.jsonl, checkpoints and summary.json go (default: runs/<time>-<algo>-<task>).")
@click.option("--resume", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Continue the run in this directory from its latest checkpoint, with its saved config.")
@click.option("--dry-run", is_flag=True, help="Resolve plugins and options, print the config, and exit.")
@click.option("--trace", is_flag=True, help="Print every hook call and result (pluggy tracing) to stderr.")
@_user_errors
def run(algo: str | None, backend: str | None, rollout: str | None, task: str | None, hardware: str | None,
        model: str | None, config_file: Path | None, overrides: tuple[str, ...], steps: int | None,
        seed: int | None, run_dir: Path | None, resume: Path | None, dry_run: bool, trace: bool) -> None:
    """Train a policy with RL. With no options: GRPO teaches an embedded tiny model arithmetic on this CPU.

    Options resolve in this order, later wins: plugin defaults, the saved config of --resume,
    --config, the flags above, --set.
    """
    from rlcore.loop import Trainer, write_config
    from rlcore.run_config import resolve

    raw: dict[str, Any] = {}
    if resume is not None:
        raw = load_file(resume / "config.yaml")
        run_dir = resume
    if config_file is not None:
        raw = merge(raw, load_file(config_file))
    flags = {"plugins": {k: v for k, v in dict(algo=algo, backend=backend, rollout=rollout, task=task,
                                                  hardware=hardware).items() if v is not None},
             "trainer": {k: v for k, v in dict(model=model, steps=steps, seed=seed).items() if v is not None}}
    raw = merge(merge(raw, flags), parse_overrides(list(overrides)))
    cfg = resolve(raw)
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        import yaml

        click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)
        click.echo("dry run: plugins resolved and options valid.")
        return
    if run_dir is None:
        run_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.selection['algo']}-{cfg.selection['task']}"
    click.echo(write_config(cfg, run_dir), nl=False)
    click.echo(f"run directory: {run_dir}")
    trainer = Trainer(cfg, run_dir, trace=trace)
    try:
        trainer.setup(resume=resume is not None)
        summary = trainer.run()
    finally:
        trainer.close()
    click.echo(f"\nreward {summary.reward_start:.3f} -> {summary.reward_end:.3f} "
               f"(mean reward/mean of the first and last 10 steps), {summary.steps} steps in {summary.seconds:.0f} s")
    click.echo(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, summary.json)")
    click.echo("next: `rlcore report {0}` draws the curves; `rlcore run --resume {0} --set trainer.steps=N` "
               "trains on; try --algo, --task or --model PATH (`rlcore plugins` lists what is installed).".format(run_dir))


@main.command(name="plugins")
@_user_errors
def plugins_cmd() -> None:
    """List installed plugins: kind, name, distribution, version, status."""
    rows = [(p.kind, p.name, p.distribution, p.version,
             "disabled" if p.disabled else f"error: {p.error}" if p.error else "ok") for p in plugins.describe_all()]
    header = ("KIND", "NAME", "DISTRIBUTION", "VERSION", "STATUS")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="PNG path (default RUN_DIR/report.png).")
@_user_errors
def report(run_dir: Path, out: Path | None) -> None:
    """Draw reward, response length, loss and entropy curves of a run to PNG."""
    from rlcore.report import draw

    click.echo(f"wrote {draw(run_dir, out)}")
