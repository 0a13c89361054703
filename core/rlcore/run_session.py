"""One `rlcore run` in its run directory: take the lock, refuse to mix with another run, save the config
once it is valid, train, and stop cleanly on SIGTERM / SIGINT, saying what happened and how to go on."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path

import click
import yaml

from rlcore.checkpoint import Checkpoints
from rlcore.errors import RunDirError, StopNow
from rlcore.loop import Trainer
from rlcore.models import launch_rank
from rlcore.resume import Change
from rlcore.rundir import RunLock, prepare_fresh, present_artifacts, record, remove_artifacts, write_config
from rlcore.run_config import ResolvedConfig
from rlcore.stopping import GracefulStop, exit_status, ignore_signals


def resume_command(run_dir: Path) -> str:
    """The command that continues this run (under torchrun, with the same launcher)."""
    command = f"rlcore run --resume {shlex.quote(str(run_dir))}"
    if "WORLD_SIZE" in os.environ:
        return f"torchrun <the same options> -m {command}"
    return command


def train(cfg: ResolvedConfig, run_dir: Path, resume: bool, changes: list[Change], overwrite: bool,
          trace: bool) -> None:
    """Train in `run_dir` (a new run, or `resume` one) until `trainer.steps` or a signal."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if launch_rank() != 0:
        _serve_rank(cfg, run_dir, trace)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        Checkpoints(run_dir / "checkpoints").remove_temporary()
        before: set[str] = set()
        if not resume:
            prepare_fresh(run_dir, overwrite)
            before = present_artifacts(run_dir)
            write_config(run_dir, text)
            record(run_dir, "start", 0)
        click.echo(text, nl=False)
        click.echo(f"run directory: {run_dir}")
        trainer = Trainer(cfg, run_dir, trace=trace)
        stop = GracefulStop(on_request=lambda name: click.echo(
            f"\n{name}: {f'finishing step {trainer.working_on}' if trainer.working_on else 'stopping'}, then saving "
            "a checkpoint (send it again to stop at once, without one)", err=True))
        try:
            with stop:
                try:
                    trainer.setup(resume=resume)
                except BaseException:
                    if not resume:  # a new run that never started leaves the directory as it found it
                        trainer.close()
                        remove_artifacts(run_dir, keep=before)
                    raise
                if resume and not _resumed(trainer, cfg, run_dir, text, changes):
                    return
                summary = trainer.run(stop)
        except StopNow as e:
            name = signal.Signals(e.signum).name
            last = Checkpoints(run_dir / "checkpoints").newest_written()
            record(run_dir, "stop", trainer.step, signal=name, checkpoint=str(last) if last else None)
            click.echo(f"\n{name} again: stopped at once, without a checkpoint; "
                       + (f"the newest is {last.name}; resume with: {resume_command(run_dir)}" if last
                          else "no checkpoint was written yet"), err=True)
            raise
        finally:
            trainer.close()
        if trainer.stopped_by is not None:
            record(run_dir, "stop", trainer.step, signal=trainer.stopped_by, checkpoint=summary.last_checkpoint)
            where = (f"checkpoint {summary.last_checkpoint}" if summary.last_checkpoint
                     else "no step finished, nothing saved")
            click.echo(f"stopped by {trainer.stopped_by} at step {trainer.step} ({where}); resume with: "
                       f"{resume_command(run_dir)}", err=True)
            raise click.exceptions.Exit(exit_status(signal.Signals[trainer.stopped_by]))
        record(run_dir, "finish", trainer.step, checkpoint=summary.last_checkpoint)
    click.echo(f"\nreward {summary.reward_start:.3f} -> {summary.reward_end:.3f} "
               f"(mean reward/mean of the first and last 10 steps), {summary.steps} steps in {summary.seconds:.0f} s")
    click.echo(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, summary.json, history.jsonl)")
    click.echo("next: `rlcore report {0}` draws the curves; `rlcore run --resume {0} --steps N` "
               "trains on; try --algo, --task or --model PATH (`rlcore plugins` lists what is installed).".format(run_dir))


def _resumed(trainer: Trainer, cfg: ResolvedConfig, run_dir: Path, text: str, changes: list[Change]) -> bool:
    """Say where the run resumed and what changed, then save the config and record the resume; False when
    there is nothing left to train."""
    for path, why in trainer.skipped:
        click.echo(f"skipped incomplete checkpoint {path.name} ({why}); removed it")
    if trainer.resumed_from is None:
        click.echo(f"no checkpoint in {run_dir / 'checkpoints'} yet: the run starts over from step 0 with its saved "
                   "config")
    else:
        click.echo(f"resumed from {trainer.resumed_from} at step {trainer.step}")
    if cfg.trainer.steps < trainer.step:
        raise RunDirError(f"--resume {run_dir}: trainer.steps={cfg.trainer.steps} is below the resumed step "
                          f"{trainer.step}; pass --steps N with N > {trainer.step} to train on")
    if changes:
        click.echo(f"changed from step {trainer.step + 1} on: {'; '.join(map(str, changes))}")
    write_config(run_dir, text)
    record(run_dir, "resume", trainer.step,
           checkpoint=str(trainer.resumed_from) if trainer.resumed_from else None,
           skipped=[{"checkpoint": str(p), "reason": why} for p, why in trainer.skipped],
           changes=[{"key": c.key, "from": c.old, "to": c.new} for c in changes])
    if cfg.trainer.steps == trainer.step:
        click.echo(f"the run is complete at step {trainer.step} (trainer.steps); pass --steps N with N > "
                   f"{trainer.step} to train on")
        return False
    (run_dir / "summary.json").unlink(missing_ok=True)  # the run is no longer finished
    return True


def _serve_rank(cfg: ResolvedConfig, run_dir: Path, trace: bool) -> None:
    """A torchrun rank other than 0: its backend serves rank 0's loop from inside `setup` and exits there;
    rank 0 alone holds the lock, writes the run directory and handles signals."""
    ignore_signals()
    trainer = Trainer(cfg, run_dir, trace=trace)
    try:
        trainer.setup(resume=False)  # rank 0 chooses the checkpoint and loads it into every rank
    finally:
        trainer.close()
    raise RunDirError(f"under torchrun (rank {launch_rank()}) the {cfg.selection['backend']!r} backend trains in one "
                      "process, so every rank would run the whole loop: launch it without torchrun, or use a backend "
                      "that uses the ranks (--backend fsdp)")
