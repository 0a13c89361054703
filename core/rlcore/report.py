"""`rlcore report`'s PNG: the reward, length, loss and entropy curves of a run (the HTML page is
`rlcore.report_page`)."""

from __future__ import annotations

from pathlib import Path

from rlcore.errors import RLCoreError
from rlcore.metrics import MetricsLog

PANELS = (("reward/mean", "reward/std", "reward"), ("response_length/mean", None, "response length (tokens)"),
          ("loss", None, "loss"), ("entropy", None, "entropy"))


def read_rows(run_dir: Path) -> list[dict]:
    """The steps of `run_dir/metrics.jsonl`, or an error that says what to pass instead."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise RLCoreError(f"{path} does not exist: pass the run directory of an `rlcore run` (its --run-dir)")
    rows = MetricsLog.read(path)
    if not rows:
        raise RLCoreError(f"{path} holds no steps yet: run at least one step first")
    return rows


def draw(run_dir: Path, out: Path | None = None) -> Path:
    """Plot `run_dir/metrics.jsonl` into `out` (default `run_dir/report.png`) and return the path."""
    rows = read_rows(run_dir)
    try:
        import matplotlib
    except ImportError:
        raise RLCoreError("rlcore report needs matplotlib: pip install 'rlcore[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    steps = [r["step"] for r in rows]
    for ax, (key, band, title) in zip(axes.flat, PANELS):
        ys = [r.get(key) for r in rows]
        xs = [s for s, y in zip(steps, ys) if y is not None]
        ys = [y for y in ys if y is not None]
        ax.set_title(title)
        ax.set_xlabel("step")
        if not ys:
            ax.text(0.5, 0.5, f"no {key!r} logged", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.plot(xs, ys, lw=1.5)
        if band:
            sd = [r.get(band) or 0.0 for r in rows if r.get(key) is not None]
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2)
        ax.grid(alpha=0.3)
    fig.suptitle(f"rlcore run {run_dir.name}")
    fig.tight_layout()
    out = out or run_dir / "report.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
