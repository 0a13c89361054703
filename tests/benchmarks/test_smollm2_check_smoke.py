"""Smoke test of `benchmarks/smollm2_check.py` on the embedded tiny model (2 heads of size 32, which vLLM's
CPU attention supports) with three short GSM8K-style problems: the hf and vllm `rlcore eval` workers, the
comparison report, and a two-step GRPO run with its before/after evaluation. Plus its statistics alone.

The vllm half needs vllm importable in this interpreter, in $RLCORE_VLLM_PYTHON or in the repository's
`.venv-vllm` (see the harness's `--vllm-python`); without it that test is skipped and the hf-only one runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "benchmarks" / "smollm2_check.py"
sys.path.insert(0, str(HARNESS.parent))

import smollm2_check  # noqa: E402

PROBLEMS = [("1+1", 2), ("2+3", 5), ("4+4", 8), ("3+1", 4)]


def test_wilson_interval_and_mcnemar() -> None:
    lo, hi = smollm2_check.wilson(0, 50)
    assert lo == 0.0 and 0.06 < hi < 0.08  # 0/50: [0, 7.1%]
    lo, hi = smollm2_check.wilson(25, 50)
    assert lo == pytest.approx(0.366, abs=1e-3) and hi == pytest.approx(0.634, abs=1e-3)
    assert smollm2_check.mcnemar_exact(0, 0) == 1.0
    assert smollm2_check.mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert smollm2_check.mcnemar_exact(3, 3) == 1.0


def _records(correct: list[int], texts: list[str]) -> dict:
    return {"samples_per_problem": 1,
            "problems": [{"id": str(i), "correct": c, "samples": 1, "accuracy": float(c), "texts": [t]}
                         for i, (c, t) in enumerate(zip(correct, texts))]}


def test_compare_paired_greedy_results() -> None:
    hf = _records([1, 0, 1, 0], ["a", "b", "c", "d"])
    vl = _records([1, 1, 1, 0], ["a", "x", "c", "d"])
    c = smollm2_check.compare(hf, vl)
    assert c["accuracy"] == [0.5, 0.75] and c["correct"] == [2, 3]
    assert c["difference"] == pytest.approx(0.25)
    assert c["se_difference"] == pytest.approx(math.sqrt(0.25 / 4 + 0.1875 / 4))
    assert c["verdict_agreement"] == 0.75 and c["identical_text"] == 0.75
    assert (c["only_first_correct"], c["only_second_correct"]) == (0, 1) and c["mcnemar_p"] == 1.0
    assert c["within_noise"]
    # identical results: zero difference, agree, even at 0% accuracy (zero standard error)
    same = smollm2_check.compare(_records([0] * 4, list("abcd")), _records([0] * 4, list("abcd")))
    assert same["within_noise"] and same["difference"] == 0 and same["identical_text"] == 1.0


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from rlcore.models import build_tiny_model

    root = tmp_path_factory.mktemp("smollm2_check")
    model = build_tiny_model(root / "model", heads=2)
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"{q}={a}\n#### {a}"}) + "\n" for q, a in PROBLEMS))
    return model, data


def _harness(model: Path, data: Path, work: Path, *extra: str) -> tuple[str, dict]:
    out = work / "result.json"
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--model", str(model), "--gsm8k", str(data), "--problems", "3",
         "--max-new-tokens", "4", "--train-steps", "2", "--train-prompts", "2", "--train-n", "2",
         "--train-max-new-tokens", "3", "--train-style", "compact", "--train-max-operand", "4", "--train-ops", "+",
         "--train-lr", "1e-3", "--train-eval-problems", "4", "--work-dir", str(work), "--json", str(out), *extra],
        capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, f"harness failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads(out.read_text())


def _check_grpo(stdout: str, report: dict) -> None:
    assert "== GRPO on arithmetic (compact style, operands 0-4" in stdout, stdout
    assert "training reward (mean of sampled rewards, T=1.0): first 1 steps" in stdout, stdout
    assert "held-out greedy pass@1 on 4 test problems: before" in stdout, stdout
    grpo = report["grpo"]
    assert len(grpo["reward_steps"]) == 2 and grpo["eval_problems"] == 4
    assert 0.0 <= grpo["eval_before"] <= 1.0 and 0.0 <= grpo["eval_after"] <= 1.0


@pytest.mark.slow
def test_hf_only_and_grpo(assets: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = assets
    stdout, report = _harness(model, data, tmp_path / "work", "--no-vllm")
    assert "vllm skipped" in stdout, stdout
    assert report["greedy"]["hf"]["problems"] == 3 and report["greedy"]["hf"]["samples_per_problem"] == 1
    _check_grpo(stdout, report)


@pytest.mark.slow
@pytest.mark.vllm
def test_hf_and_vllm_greedy_agree(assets: tuple[Path, Path], tmp_path: Path) -> None:
    python = smollm2_check.vllm_python()
    if python is None:
        pytest.skip("vllm is not importable (neither here, in $RLCORE_VLLM_PYTHON nor in .venv-vllm): "
                    "pip install 'rlcore-backends[vllm]' in its own venv (see README, `--rollout vllm`)")
    model, data = assets
    stdout, report = _harness(model, data, tmp_path / "work", "--vllm-python", python,
                              "--vllm-set", "rollout.max_model_len=128", "--no-train")
    for field in ("== GSM8K greedy: hf vs vllm rollout: 3 problems x 1 sample(s) ==", "difference vllm - hf:",
                  "binomial SE", "95% interval", "per problem: same verdict", "identical greedy text",
                  "exact McNemar p", "wall time"):
        assert field in stdout, f"{field!r} missing:\n{stdout}"
    greedy = report["greedy"]
    assert greedy["problems"] == 3 and greedy["within_noise"]
    # fp32 greedy decoding of the same weights: the same answers, problem by problem
    assert greedy["identical_text"] == 1.0 and greedy["verdict_agreement"] == 1.0, greedy
    assert greedy["hf_eval_s"] > 0 and greedy["vllm_eval_s"] > 0
    assert "grpo" not in report
