import itertools
import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from rlcore.cli import main
from rlcore.evaluate import is_correct, pass_at_k


@given(st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_exact_subset_probability(nck):
    n, c, k = nck
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_k_bounds():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError, match="pass@5 needs at least 5"):
        pass_at_k(4, 1, 5)


def test_correct_comes_from_the_task_then_the_reward():
    assert is_correct({"correct": 1.0}, 0.2) and not is_correct({"correct": 0.0}, 1.0)
    assert is_correct({}, 1.0) and not is_correct({}, 0.99)


def test_eval_command_reports_pass_at_k(tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", "--limit", "6", "-n", "4", "--k", "1,4", "--out", str(out),
                                  "--set", "sampling.max_new_tokens=4", "--set", "trainer.seed=1"])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["problems"] == 6 and result["samples_per_problem"] == 4 and result["split"] == "test"
    p1, p4 = result["pass_at"]["pass@1"], result["pass_at"]["pass@4"]
    assert 0.0 <= p1 <= p4 <= 1.0 and math.isclose(p1, result["reward_mean"], abs_tol=1e-9)


@pytest.mark.parametrize("args,message", [(["--k", "1,8", "-n", "4"], "each k must be between 1 and --samples"),
                                          (["--k", "x"], "expected comma-separated integers")])
def test_eval_bad_k(args, message):
    r = CliRunner().invoke(main, ["eval", *args])
    assert r.exit_code == 2 and message in r.output
