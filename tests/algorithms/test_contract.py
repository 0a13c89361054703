"""Every algorithm entry point loads, fits the hook contract and has valid default options."""

from __future__ import annotations

import pytest

from rlcore import PolicyLoss, plugins
from rlcore.testing import check_algorithm, make_batch

ALGOS = ["grpo", "drgrpo", "gmpo", "dapo", "gspo", "rloo", "reinforce_pp"]


def test_all_installed():
    assert set(ALGOS) <= set(plugins.available("algo"))


@pytest.mark.parametrize("name", ALGOS)
def test_registers_and_answers(name):
    algo = plugins.instantiate(plugins.load("algo", name), None, "algo")
    registry = plugins.Registry()
    registry.register("algo", name, algo)
    for hook in ("advantage", "policy_loss", "keep_groups", "setup", "step_metrics", "save_state", "load_state"):
        assert registry.implements("algo", hook), hook
    batch = make_batch()
    loss = registry.hook.policy_loss()
    assert isinstance(loss, PolicyLoss) and not loss.needs_ref_logprobs and not loss.needs_entropy
    adv = registry.hook.advantage(batch=batch)
    assert adv.shape == batch.response_ids.shape
    keep = registry.hook.keep_groups(batch=batch)
    if name == "dapo":  # dynamic sampling on by default: one flag per group
        assert len(keep) == 1 and keep[0].shape == (2,)
    else:
        assert keep == []
    assert registry.hook.step_metrics() == [{"algo/kl_coef": 0.0}]


@pytest.mark.parametrize("name", ALGOS)
@pytest.mark.parametrize("options", [None, {"kl_coef": 0.05, "entropy_coef": 0.01, "tis_cap": 2.0},
                                     {"kl_coef": 0.05, "kl_mode": "reward", "kl_target": 0.1}],
                         ids=["defaults", "kl-loss", "kl-reward"])
def test_core_contract_check(name, options):
    check_algorithm(plugins.instantiate(plugins.load("algo", name), options, "algo"))
