"""Smoke test of `benchmarks/precision.py` on a small random Qwen2 (MLP inner dimension 1536, as SmolLM2's)
with the shipped GSM8K rows: every precision runs, and the table shows bfloat16_matched agreeing where plain
bfloat16 does not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlcore.models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_precision_benchmark_prints_each_dtype_and_its_gap(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "model", hidden=384, layers=4, heads=6)
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "precision.py"), "--model", str(model),
         "--gsm8k", str(REPO / "examples" / "data" / "gsm8k" / "test.jsonl"), "--prompts", "2", "--n", "2",
         "--max-new-tokens", "12", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"matmul peak fp32 [\d.]+ TFLOP/s, bf16 [\d.]+ TFLOP/s", out.stdout)
    rows = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(
        r"^\| (\w+) \|(?: [\d.]+ \|){4} [\d.]+x \| ([\d.e+-]+) \| ([\d.e+-]+) \|", out.stdout, re.M)}
    assert set(rows) == {"float32", "bfloat16", "bfloat16_matched"}, out.stdout
    assert rows["float32"][0] < 1e-5 and rows["bfloat16_matched"][0] < 1e-5
    assert rows["bfloat16"][0] > 1e-4


def test_a_missing_model_is_one_line_naming_the_option(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "precision.py"), "--model", str(tmp_path / "no")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].endswith("Pass --model PATH.")
    assert "Traceback" not in out.stderr
