"""The hook contract checked at the core's boundary: each malformed result is named with its plugin and
hook, what was expected and what came back; well-formed results pass unchanged."""

from __future__ import annotations

import attrs
import pytest
import torch

from rlcore.contract import Contract
from rlcore.errors import PluginError
from rlcore.testing import make_batch, make_prompts
from rlcore.types import Scores, Weights

NAMES = {"rollout": "myrollout", "task": "mytask", "algo": "myalgo", "backend": "mybackend"}


@pytest.fixture
def contract() -> Contract:
    return Contract(NAMES)


@pytest.fixture
def batch():
    return make_batch(groups=2, n=4, with_advantages=True)


def test_well_formed_results_pass(contract, batch):
    assert contract.sample(batch, make_prompts(2), 4) is batch
    assert contract.score(Scores(rewards=torch.zeros(8), info=[{}] * 8), batch).rewards.shape == (8,)
    assert contract.advantage(batch.advantages, batch) is batch.advantages
    assert contract.logprobs(batch.rollout_logprobs, batch, reference=False) is batch.rollout_logprobs
    assert contract.update({"loss": 0.1, "steps": 1}) == {"loss": 0.1, "steps": 1}
    assert contract.keep_groups([True, False], batch, "algo").tolist() == [True, False]
    contract.policy_weights(Weights(named_tensors=lambda: iter(())))


def test_an_advantage_of_shape_b_names_the_plugin_and_the_shapes(contract, batch):
    with pytest.raises(PluginError) as e:
        contract.advantage(torch.zeros(8), batch)
    assert str(e.value) == ("algo plugin 'myalgo', hook 'advantage': expected advantages [B, R]: a float tensor of "
                            "shape [8, 6]; got a torch.float32 tensor of shape [8]")


def test_an_advantage_of_shape_b_passes_nothing_even_when_b_equals_r(contract):
    square = make_batch(groups=2, n=3, response_len=6, with_advantages=True)
    with pytest.raises(PluginError, match=r"shape \[6, 6\]; got a torch.float32 tensor of shape \[6\]"):
        contract.advantage(torch.zeros(6), square)


@pytest.mark.parametrize("breach, message", [
    (lambda a, m: a.masked_fill(m == 0, 1.0), "expected 0 outside the loss mask"),
    (lambda a, m: a.masked_fill(m > 0, float("nan")), "expected finite advantages"),
    (lambda a, m: a.long(), "a float tensor"),
])
def test_advantage_breaches(contract, batch, breach, message):
    with pytest.raises(PluginError, match=message):
        contract.advantage(breach(batch.advantages, batch.response_mask), batch)


def test_sample_breaches(contract, batch):
    prompts = make_prompts(2)
    with pytest.raises(PluginError, match=r"rollout plugin 'myrollout', hook 'sample': expected 4 responses for each "
                                          r"of 2 prompts \(8\); got 6 responses"):
        contract.sample(batch.select(range(6)), prompts, 4)
    shuffled = attrs.evolve(batch, group_ids=torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]))
    with pytest.raises(PluginError, match=r"group ids 0..1, each 4 times; got counts \[3, 5\]"):
        contract.sample(shuffled, prompts, 4)
    positive = attrs.evolve(batch, rollout_logprobs=batch.rollout_logprobs.abs() + batch.response_mask)
    with pytest.raises(PluginError, match="rollout_logprobs <= 0 on the loss tokens"):
        contract.sample(positive, prompts, 4)
    with pytest.raises(PluginError, match="a consistent RolloutBatch; got malformed RolloutBatch"):
        contract.sample(attrs.evolve(batch, group_ids=batch.group_ids[:3]), prompts, 4)
    with pytest.raises(PluginError, match="expected a RolloutBatch; got list"):
        contract.sample([], prompts, 4)


def test_score_breaches(contract, batch):
    with pytest.raises(PluginError, match=r"task plugin 'mytask', hook 'score': expected rewards: a tensor of shape \[8\]"):
        contract.score(Scores(rewards=torch.zeros(8, 1)), batch)
    with pytest.raises(PluginError, match="expected info: 8 dicts"):
        contract.score(Scores(rewards=torch.zeros(8), info=[{}] * 3), batch)
    with pytest.raises(PluginError, match="expected a Scores; got list"):
        contract.score([1.0] * 8, batch)


def test_logprob_update_weights_and_filter_breaches(contract, batch):
    with pytest.raises(PluginError, match=r"backend plugin 'mybackend', hook 'logprobs': expected reference logprobs"):
        contract.logprobs(torch.zeros(8, 5), batch, reference=True)
    with pytest.raises(PluginError, match="logprobs \\[B, R\\] <= 0 on the loss tokens"):
        contract.logprobs(batch.rollout_logprobs.abs() + 1, batch, reference=False)
    with pytest.raises(PluginError, match="hook 'update': expected a dict of metric names to numbers"):
        contract.update({"loss": torch.tensor(1.0)})
    with pytest.raises(PluginError, match="hook 'policy_weights'"):
        contract.policy_weights({"w": torch.zeros(1)})
    with pytest.raises(PluginError, match=r"hook 'keep_groups': expected a bool tensor of shape \[2\]"):
        contract.keep_groups(torch.ones(8, dtype=torch.bool), batch, "algo")
