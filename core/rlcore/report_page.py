"""`rlcore report`'s HTML page: one self-contained file (inline SVG charts, CSS and a few lines of script;
nothing fetched) with a run's curves, summary, config and generation tables, or several runs side by side."""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from rlcore.generations import read as read_generations
from rlcore.generations import table
from rlcore.report import read_rows

PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Reward", ("reward/mean",)),
    ("Evaluation", ("eval/pass@1", "eval/reward")),
    ("Response length (tokens)", ("response_length/mean", "response_length/max")),
    ("KL", ("kl_ref", "approx_kl")),
    ("Entropy", ("entropy",)),
    ("Clip fraction", ("clip_frac", "clip_frac_low", "clip_frac_high")),
    ("Loss", ("loss", "pg_loss")),
    ("Gradient norm", ("grad_norm",)),
    ("Learning rate", ("lr",)),
    ("Throughput (tokens/s)", ("tokens_per_s", "rollout/tokens_per_s", "update/tokens_per_s")),
    ("Time per step (s)", ("timing/step", "timing/sample", "timing/logprobs", "timing/update", "timing/sync")),
)
"""Chart title and the metrics it draws (`kl_ref`: KL to the reference; `approx_kl`: within the update)."""
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d")
DASHES = ("", "6 3", "2 3", "8 3 2 3", "1 2")
WIDTH, HEIGHT = 460, 230
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 12, 28
MAX_POINTS = 800
"""Points per line drawn (longer runs are thinned evenly); the hover readout uses the same points."""


@attrs.define
class Run:
    """What the page shows of one run directory."""

    name: str
    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    summary: dict[str, Any] | None
    generations: dict[tuple[int, str], list[dict[str, Any]]]
    trackers: list[dict[str, Any]]


def load_run(run_dir: Path) -> Run:
    """Read a run directory (metrics, config, summary, generation tables, tracker records)."""
    rows = read_rows(run_dir)
    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    trackers = [json.loads(p.read_text()) for p in sorted((run_dir / "trackers").glob("*.json"))]
    return Run(run_dir.resolve().name, run_dir, rows, config or {}, summary, read_generations(run_dir), trackers)


# ---- charts --------------------------------------------------------------------------------------

def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(float(r["step"]), float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if len(points) > MAX_POINTS:
        points = [points[i * len(points) // MAX_POINTS] for i in range(MAX_POINTS)] + [points[-1]]
    return [p[0] for p in points], [p[1] for p in points]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.2e}"


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def chart(title: str, lines: list[dict[str, Any]]) -> str:
    """An SVG line chart; each line is {label, color, dash, x, y}. Its data rides along for the hover readout."""
    lines = [line for line in lines if line["x"]]
    head = f'<figure class="panel"><figcaption>{html.escape(title)}</figcaption>'
    if not lines:
        return head + '<p class="empty">not logged in this run</p></figure>'
    xs = [x for line in lines for x in line["x"]]
    ys = [y for line in lines for y in line["y"]]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.06 or abs(y0) * 0.1 or 1.0
    y0, y1 = (y0 - pad if y0 - pad >= 0 or y0 < 0 else 0.0), y1 + pad
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(title)}" '
             f'data-x0="{x0}" data-x1="{x1}" data-left="{LEFT}" data-width="{pw}" '
             f'data-series="{html.escape(json.dumps(lines))}">']
    for y in _ticks(y0, y1):
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>'
                     f'<text class="tick" x="{LEFT - 4}" y="{py(y) + 3:.1f}" text-anchor="end">{_fmt(y)}</text>')
    for x in _ticks(x0, x1):
        parts.append(f'<text class="tick" x="{px(x):.1f}" y="{HEIGHT - 10}" text-anchor="middle">{x:.0f}</text>')
    parts.append(f'<text class="tick" x="{WIDTH - RIGHT}" y="{HEIGHT - 1}" text-anchor="end">step</text>')
    for line in lines:
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(line["x"], line["y"]))
        dash = f' stroke-dasharray="{line["dash"]}"' if line["dash"] else ""
        parts.append(f'<polyline class="line" points="{points}" stroke="{line["color"]}"{dash}>'
                     f'<title>{html.escape(line["label"])}</title></polyline>')
    parts.append(f'<line class="cursor" x1="0" x2="0" y1="{TOP}" y2="{TOP + ph}" visibility="hidden"/></svg>')
    legend = "".join(f'<span class="key"><svg width="22" height="8"><line x1="0" x2="22" y1="4" y2="4" '
                     f'stroke="{line["color"]}" stroke-width="2" stroke-dasharray="{line["dash"]}"/></svg>'
                     f'{html.escape(line["label"])}</span>' for line in lines)
    return head + "".join(parts) + f'<div class="legend">{legend}</div></figure>'


def panel(title: str, keys: Sequence[str], runs: list[Run]) -> str:
    """One chart: every metric of `keys` (one color each) for one run; one color per run and one dash per
    metric when comparing runs."""
    lines = []
    for r, run in enumerate(runs):
        for k, key in enumerate(keys):
            x, y = _series(run.rows, key)
            label = key if len(runs) == 1 else f"{run.name}: {key}"
            color = COLORS[(k if len(runs) == 1 else r) % len(COLORS)]
            lines.append({"label": label, "color": color, "dash": DASHES[k % len(DASHES)] if len(runs) > 1 else "",
                          "x": x, "y": y})
    return chart(title, lines)


# ---- the rest of the page ------------------------------------------------------------------------

def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary_rows(run: Run) -> list[tuple[str, str]]:
    """The summary lines of a run: what ran, how far, how well, how fast."""
    cfg, rows = run.config, run.rows
    plugins = cfg.get("plugins") or {}
    trainer = cfg.get("trainer") or {}
    rewards = [r["reward/mean"] for r in rows if isinstance(r.get("reward/mean"), (int, float))]
    k = min(10, max(1, len(rewards) // 2))
    start, end = _mean(rewards[:k]), _mean(rewards[-k:])
    seconds = sum(r.get("timing/step") or 0.0 for r in rows)
    status = ("finished" if run.summary is not None and run.summary.get("steps") == rows[-1]["step"]
              else "incomplete (no summary.json for the last step)")
    evals = [r for r in rows if isinstance(r.get("eval/pass@1"), (int, float))]
    out = [("status", status), ("steps", f"{rows[-1]['step']} of {trainer.get('steps', '?')}"),
           ("plugins", ", ".join(f"{k}={v}" for k, v in plugins.items())),
           ("model", trainer.get("model") or "embedded tiny model"),
           ("reward", f"{_fmt(start)} → {_fmt(end)} (mean of the first and last {k} steps)"
            if start is not None and end is not None else "not logged"),
           ("time", f"{seconds:.0f} s in steps, {seconds / len(rows):.3g} s/step")]
    if evals:
        out.append(("eval pass@1", f"{_fmt(evals[-1]['eval/pass@1'])} at step {evals[-1]['step']}"))
    tokens = _mean([r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))])
    if tokens is not None:
        out.append(("throughput", f"{tokens:.4g} generated tokens/s (mean over steps)"))
    for tracker in run.trackers:
        out.append((f"tracker {tracker.get('tracker')}", f"run {tracker.get('run_id')} at {tracker.get('location')}"))
    out.append(("directory", str(run.path.resolve())))
    return out


def _cell(value: Any) -> str:
    if value is None:
        return '<td class="none">–</td>'
    if isinstance(value, float):
        return f'<td class="num">{_fmt(value)}</td>'
    if isinstance(value, (int, bool)):
        return f'<td class="num">{value}</td>'
    return f"<td><pre>{html.escape(str(value))}</pre></td>"


def generations_section(run: Run) -> str:
    """The run's generation tables, newest first; the newest of each split open."""
    if not run.generations:
        return '<p class="empty">no generation tables (trainer.generations_every=0, or no step reached it yet)</p>'
    parts, opened = [], set()
    for (step, split), rows in sorted(run.generations.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        columns, data = table(rows)
        shown = [i for i, c in enumerate(columns) if c not in ("step", "split")]
        rewards = [row["reward"] for row in rows if isinstance(row.get("reward"), (int, float))]
        mean = f", mean reward {_fmt(sum(rewards) / len(rewards))}" if rewards else ""
        head = "".join(f"<th>{html.escape(columns[i])}</th>" for i in shown)
        body = "".join("<tr>" + "".join(_cell(row[i]) for i in shown) + "</tr>" for row in data)
        state = "" if split in opened else " open"
        opened.add(split)
        parts.append(f'<details class="generations" data-step="{step}" data-split="{split}"{state}>'
                     f"<summary>step {step} · {html.escape(split)} · {len(rows)} samples{mean}</summary>"
                     f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></details>")
    return "".join(parts)


STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px} .meta{color:#666;margin-bottom:16px}
.summary{border-collapse:collapse;margin:4px 0} .summary th{text-align:left;padding:2px 14px 2px 0;color:#555;
font-weight:600;vertical-align:top} .summary td{padding:2px 0}
.grid-panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:14px}
.panel{background:#fff;border:1px solid #e2e2e2;border-radius:6px;margin:0;padding:8px 10px;position:relative}
figcaption{font-weight:600;margin-bottom:2px} svg.chart{width:100%;height:auto;display:block}
.line{fill:none;stroke-width:1.6} .grid{stroke:#eee} .tick{font-size:10px;fill:#666}
.cursor{stroke:#999;stroke-dasharray:3 3} .legend{font-size:11px;color:#444}
.key{margin-right:12px;white-space:nowrap} .key svg{vertical-align:middle;margin-right:3px}
.empty{color:#999;font-style:italic} .tip{position:absolute;pointer-events:none;background:rgba(255,255,255,.95);
border:1px solid #ccc;border-radius:4px;padding:4px 6px;font-size:11px;white-space:nowrap;display:none}
details{background:#fff;border:1px solid #e2e2e2;border-radius:6px;margin:6px 0;padding:4px 10px}
summary{cursor:pointer;font-weight:600} table.gen,details table{border-collapse:collapse;width:100%;margin:6px 0}
details th,details td{border-top:1px solid #eee;padding:3px 6px;text-align:left;vertical-align:top;font-size:12px}
details pre,pre.config{margin:0;white-space:pre-wrap;word-break:break-word;font:12px/1.35 ui-monospace,monospace}
td.num{text-align:right;font-variant-numeric:tabular-nums} td.none{color:#bbb}
pre.config{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:8px;max-height:480px;overflow:auto}
"""

SCRIPT = """
document.querySelectorAll('svg.chart').forEach(function (svg) {
  var series = JSON.parse(svg.dataset.series), x0 = +svg.dataset.x0, x1 = +svg.dataset.x1;
  var left = +svg.dataset.left, width = +svg.dataset.width, cursor = svg.querySelector('.cursor');
  var tip = document.createElement('div'); tip.className = 'tip'; svg.parentNode.appendChild(tip);
  svg.addEventListener('mousemove', function (e) {
    var box = svg.getBoundingClientRect(), scale = box.width / svg.viewBox.baseVal.width;
    var step = x0 + ((e.clientX - box.left) / scale - left) / width * (x1 - x0), lines = [];
    series.forEach(function (s) {
      var best = 0;
      s.x.forEach(function (x, i) { if (Math.abs(x - step) < Math.abs(s.x[best] - step)) best = i; });
      lines.push('<b style="color:' + s.color + '">' + s.label + '</b> ' + s.y[best].toPrecision(4) +
                 ' (step ' + s.x[best] + ')');
    });
    var at = left + (Math.round(step) - x0) / (x1 - x0) * width;
    cursor.setAttribute('x1', at); cursor.setAttribute('x2', at); cursor.setAttribute('visibility', 'visible');
    tip.innerHTML = lines.join('<br>'); tip.style.display = 'block';
    tip.style.left = Math.min(e.clientX - box.left + 14, box.width - tip.offsetWidth) + 'px';
    tip.style.top = (e.clientY - box.top + 20) + 'px';
  });
  svg.addEventListener('mouseleave', function () { tip.style.display = 'none'; cursor.setAttribute('visibility', 'hidden'); });
});
document.body.dataset.charts = document.querySelectorAll('svg.chart').length;
"""


def page(runs: list[Run]) -> str:
    """The whole HTML document for one run or a comparison of several."""
    title = f"rlcore report: {runs[0].name}" if len(runs) == 1 else f"rlcore report: {len(runs)} runs compared"
    charts = "".join(panel(t, keys, runs) for t, keys in PANELS)
    sections = []
    for run in runs:
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(run))
        config = html.escape(yaml.safe_dump(run.config, sort_keys=False))
        sections.append(f'<section class="run" data-run="{html.escape(run.name)}"><h2>{html.escape(run.name)}</h2>'
                        f'<table class="summary">{rows}</table><h3>Generations</h3>{generations_section(run)}'
                        f'<h3>Config</h3><pre class="config">{config}</pre></section>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>{html.escape(title)}</h1><div class="meta">{len(runs[0].rows) if len(runs) == 1 else ""}'
            f'{" steps · " if len(runs) == 1 else ""}written {time.strftime("%Y-%m-%d %H:%M:%S")} by rlcore report · '
            f'hover a chart for values</div><h2>Curves</h2><div class="grid-panels">{charts}</div>'
            f'{"".join(sections)}<script>{SCRIPT}</script></body></html>')


def write(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write the report page of `run_dirs` to `out` and return it."""
    out.write_text(page([load_run(Path(d)) for d in run_dirs]))
    return out
