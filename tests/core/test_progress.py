"""The progress display: plain, readable lines (with KL and ETA) when the output is a log; a live bar on a terminal."""

import io
import re

import pytest
from rich.console import Console

from rlcore import metrics as metrics_module
from rlcore.metrics import ProgressDisplay, clock, headline

ROW = {"reward/mean": 0.4137, "response_length/mean": 3.5, "kl_ref": 0.0123, "approx_kl": 0.0004,
       "entropy": 2.81, "loss": -0.02, "timing/step": 1.5}


def test_a_log_gets_a_line_every_log_every_steps_with_reward_kl_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    display = ProgressDisplay(total=30, start=10, log_every=5, console=Console(file=out, force_terminal=False))
    for step in range(11, 31):
        now[0] += 2.0  # two seconds per step
        display.update(step, {**ROW, **({"eval/pass@1": 0.25} if step == 20 else {})})
    display.close()
    lines = out.getvalue().splitlines()
    assert [int(re.match(r"step (\d+)/30", line).group(1)) for line in lines] == [11, 15, 20, 25, 30]
    assert lines[0] == ("step 11/30 (37%)  reward 0.414  len 3.5  kl 0.0123  kl_old 0.0004  ent 2.81  loss -0.02  "
                        "s/step 1.5  elapsed 0:00:02  eta 0:00:38")
    assert "pass@1 0.25" in lines[2] and lines[2].endswith("elapsed 0:00:20  eta 0:00:20")
    assert lines[-1].endswith("eta 0:00:00") and "\x1b[" not in out.getvalue()


def test_missing_numbers_are_left_out() -> None:
    assert headline({"reward/mean": 1.0, "kl_ref": None, "entropy": "n/a"}) == "reward 1"
    assert clock(3725.2) == "1:02:05" and clock(-3) == "0:00:00"


def test_a_terminal_gets_a_live_bar_with_the_headline() -> None:
    out = io.StringIO()
    display = ProgressDisplay(total=4, start=0, log_every=1, console=Console(file=out, force_terminal=True, width=160))
    for step in range(1, 5):
        display.update(step, ROW)
    display.close()
    text = out.getvalue()
    assert "4/4" in text and "reward 0.414" in text and "kl 0.0123" in text and "\x1b[" in text
