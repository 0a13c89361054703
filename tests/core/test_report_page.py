"""`rlcore report`'s HTML page, checked as text and in a real headless Chromium (Debian's; `.ci/run`
installs it): the DOM after its script ran, and a screenshot that is not blank."""

import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from rlcore.cli import main
from rlcore.report_page import PANELS, load_run, page

HOSTILE = "<script>window.pwned=1</script> | a\nb"
STEPS = 12


def make_run(directory: Path, offset: float = 0.0, finished: bool = True) -> Path:
    """A run directory as `rlcore run` leaves it: metrics, config, summary, generation tables."""
    directory.mkdir(parents=True)
    rows = [{"step": s, "reward/mean": offset + s / STEPS, "reward/std": 0.1, "response_length/mean": 10.0 + s,
             "approx_kl": 0.01 * s, "entropy": 2.0 - s / 20, "clip_frac": 0.02, "loss": math.sin(s),
             "lr": 1e-3, "tokens_per_s": 100.0 + s, "timing/step": 0.5, "timing/sample": 0.3,
             **({"eval/pass@1": s / 24} if s % 6 == 0 else {})} for s in range(1, STEPS + 1)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"plugins": {"algo": "grpo", "task": "arithmetic"}, "trainer": {"steps": STEPS, "model": ""}}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    if finished:
        (directory / "summary.json").write_text(json.dumps({"steps": STEPS}))
    tables = [{"step": s, "split": split, "prompt": f"user: {s}+{i}=", "response": HOSTILE if i == 0 else str(s + i),
               "reward": float(i % 2), "finish_reason": "stop", "tool_calls": None, "correct": float(i % 2)}
              for s in (6, 12) for split in ("train", "eval") for i in range(3)]
    (directory / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tables))
    (directory / "trackers").mkdir()
    (directory / "trackers" / "tensorboard.json").write_text(json.dumps(
        {"tracker": "tensorboard", "run_id": "x", "location": str(directory / "tensorboard")}))
    return directory


class Dom(HTMLParser):
    """The elements of a page as (tag, attributes) plus the text inside each kind of element."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.text: dict[str, list[str]] = {}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag not in ("br", "meta", "line", "polyline", "input", "img"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.stack:
            while self.stack and self.stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if self.stack:
            self.text.setdefault(self.stack[-1], []).append(data)

    def all(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]


def test_the_page_holds_every_curve_the_summary_config_and_escaped_generations(tmp_path: Path) -> None:
    text = page([load_run(make_run(tmp_path / "run"))])
    dom = Dom(text)
    assert "http://" not in text and "https://" not in text and "src=" not in text, "nothing is fetched"
    titles = [t for t in dom.text["figcaption"]]
    assert titles == [title for title, _ in PANELS]
    charts = dom.all("svg", "chart")
    drawn = [json.loads(c["data-series"]) for c in charts]
    reward = next(d for d in drawn if d[0]["label"] == "reward/mean")
    assert reward[0]["x"] == list(range(1, STEPS + 1)) and reward[0]["y"][-1] == pytest.approx(1.0)
    assert "not logged in this run" in text, "a panel of metrics the run lacks (grad_norm) says so"
    assert "<script>window.pwned" not in text and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in text
    assert len(dom.all("details", "generations")) == 4
    assert [d["data-step"] + d["data-split"] for d in dom.all("details", "generations")] == \
        ["12eval", "12train", "6eval", "6train"]
    assert "algo: grpo" in "".join(dom.text["pre"]) and "finished" in "".join(dom.text["td"])
    assert "0.292 → 0.792 (mean of the first and last 6 steps)" in text
    assert "tracker tensorboard" in text


def test_comparing_runs_draws_one_line_per_run_and_a_section_each(tmp_path: Path) -> None:
    runs = [load_run(make_run(tmp_path / "a")), load_run(make_run(tmp_path / "b", offset=1.0, finished=False))]
    dom = Dom(page(runs))
    reward = next(json.loads(c["data-series"]) for c in dom.all("svg", "chart") if c["aria-label"] == "Reward")
    assert [line["label"] for line in reward] == ["a: reward/mean", "b: reward/mean"]
    assert reward[0]["color"] != reward[1]["color"] and reward[1]["y"][0] == pytest.approx(1 + 1 / STEPS)
    assert [s["data-run"] for s in dom.all("section", "run")] == ["a", "b"]
    assert "incomplete (no summary.json for the last step)" in "".join(dom.text["td"])


def test_the_command_writes_the_page_and_the_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.chdir(tmp_path)
    other = make_run(tmp_path / "other")
    result = CliRunner().invoke(main, ["report", str(run), str(other)])
    assert result.exit_code == 0 and "wrote rlcore-report.html" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty)])
    assert result.exit_code == 2 and "metrics.jsonl does not exist" in result.output


# ---- in a real browser ---------------------------------------------------------------------------

def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Debian's Chromium, headless, with the flags this closed network needs and a fresh profile."""
    binary = shutil.which("chromium")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("needs Debian's chromium (apt-get install chromium), which .ci/run installs")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_chromium_runs_the_page_and_renders_it(tmp_path: Path) -> None:
    """About 3 s: the DOM after the page's script ran, and a screenshot with the charts drawn."""
    html_path = tmp_path / "report.html"
    html_path.write_text(page([load_run(make_run(tmp_path / "a")), load_run(make_run(tmp_path / "b", 0.5))]))
    dom = Dom(chromium(tmp_path, "--dump-dom", html_path.as_uri()).stdout)
    charts = dom.all("svg", "chart")
    body = dom.all("body")[0]
    assert body.get("data-charts") == str(len(charts)) and len(charts) >= 9, "the script ran to its end"
    assert len(dom.all("div", "tip")) == len(charts), "every chart got its hover readout"
    lines = dom.all("polyline", "line")
    assert lines and all(len(line["points"].split()) >= 2 for line in lines)
    assert not dom.all("script", None)[1:], "the hostile response stayed text"
    assert "window.pwned" in "".join(dom.text.get("pre", []))
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1280,1600", f"--screenshot={shot}", html_path.as_uri())
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 200, "text and charts were drawn, not a blank page"
    # the first chart's lines: pixels of the first two runs' colors (blue and red) in the top part of the page
    top = [rgb for _, rgb in image.crop((0, 0, 1280, 700)).getcolors(maxcolors=1 << 20)]
    assert any(b > 200 and r < 80 for r, g, b in top), "a blue line"
    assert any(r > 200 and g < 80 and b < 80 for r, g, b in top), "a red line"
