"""Smoke test of `benchmarks/trl_compare.py`: one round of one step of rlcore and TRL on the 5M model.

Needs trl (1.16) importable, in this interpreter, in $RLCORE_TRL_PYTHON or in the repository's
`.venv-trl` (see the harness's `--trl-python`); the Qwen3 tokenizer ships in tests/data.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "benchmarks" / "trl_compare.py"
sys.path.insert(0, str(HARNESS.parent))

from trl_compare import trl_python  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS, GROUP, TOKENS = 2, 2, 8


@pytest.fixture(scope="module")
def trl_interpreter() -> str:
    python = trl_python()
    if python is None:
        pytest.skip("trl is not importable (neither here, in $RLCORE_TRL_PYTHON nor in .venv-trl): "
                    "python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 'trl==1.16.*' "
                    "and the rlcore packages (-e . -e plugins/...)")
    return python


def test_one_round_one_step_on_the_5m_model_prints_the_full_report(trl_interpreter: str, tmp_path: Path) -> None:
    out_json = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--model", "5m", "--rounds", "1", "--steps", "1", "--warmup", "0",
         "--prompts", str(PROMPTS), "--group", str(GROUP), "--tokens", str(TOKENS), "--peak-budget", "5",
         "--work-dir", str(tmp_path / "work"), "--trl-python", trl_interpreter, "--json", str(out_json)],
        capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert proc.returncode == 0, f"harness failed:\n{proc.stdout}\n{proc.stderr}"
    report = proc.stdout
    for field in ("== rlcore vs TRL GRPOTrainer: model 5m ==", "matmul peak", "steps/s",
                  "generated tokens/s (end to end)", "phase generation s/step", "phase logprob s/step",
                  "phase update s/step", "peak RSS MiB", "per-round throughput ratio rlcore/TRL",
                  "update FLOP utilisation rlcore", "update FLOP utilisation TRL", "% of fp32 peak",
                  "% of bf16 peak", "update dtype float32", "rlcore/TRL", "trl 1.16",
                  "each distinct prompt once as share_prompts runs it"):
        assert field in report, f"{field!r} missing from the report:\n{report}"
    # Both sides generated exactly the fixed completion length.
    expected = PROMPTS * GROUP * TOKENS
    assert f"generated tokens per step: rlcore {expected}, TRL {expected} (target {expected})" in report, report
    # One numeric row per metric: rlcore, TRL and their ratio.
    number = r"(?:[\d,.]+(?:e-?\d+)?|n/a)"
    for metric in ("steps/s", r"generated tokens/s \(end to end\)", r"peak RSS MiB \(wait4 ru_maxrss\)"):
        assert re.search(rf"^{metric}\s+{number}\s+{number}\s+{number}$", report, re.M), (metric, report)
    targets = dict(re.findall(r"^TARGET (.+?): (PASS|FAIL|N/A) \(measured ", report, re.M))
    for name in ("end-to-end throughput >= 3x TRL, hf rollout, 50M", "update >= 40% of measured bf16 matmul peak, 50M",
                 "peak RSS <= TRL's"):
        assert name in targets, (name, report)
    # the throughput and utilisation targets are defined on the 50M model
    assert targets["end-to-end throughput >= 3x TRL, hf rollout, 50M"] == "N/A"
    assert targets["update >= 40% of measured bf16 matmul peak, 50M"] == "N/A"
    result = json.loads(out_json.read_text())
    assert result["throughput_ratio"] > 0 and result["rss_ratio"] > 0
    for side in ("rlcore", "trl"):
        assert result[side]["gen_tokens"] == expected and result[side]["timed_steps"] == 1
        assert result[side]["rss_peak_mib"] > 100  # a process holding torch and a model
