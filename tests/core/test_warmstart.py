"""`rlcore warmstart`: demonstrations rendered by the chat template, trained on exactly the tokens a multi-turn
rollout has the policy generate, through the backend's update hook; the result is a loadable model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

from rlcore import LossInputs, LossNorm, Prompt, SamplingParams
from rlcore.cli import main
from rlcore.errors import DataError
from rlcore.models import build_tiny_tool_tokenizer, load_tokenizer
from rlcore.warmstart import SupervisedLoss, conversation_batch, conversation_pieces
from rlcore_backends.rollout.engine import Completion, TurnOptions, run_turns
from rlcore_tasks.tools import Calculator

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tool-use" / "cpu.yaml"
CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "347*829"}}}
DEMO = [{"role": "user", "content": "347*829="}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "287663"}, {"role": "assistant", "content": "287663"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tool_tokenizer(directory)
    return load_tokenizer(str(directory))


def test_pieces_are_the_assistant_turns_up_to_their_end_token(tok: Any) -> None:
    prompt, pieces = conversation_pieces(tok, DEMO)
    assert prompt == "<|im_start|>user\n347*829=<|im_end|>\n<|im_start|>assistant\n"
    assert pieces == [
        ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "347*829"}}\n</tool_call><|im_end|>', True),
        ("\n<|im_start|>user\n<tool_response>\n287663\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("287663<|im_end|>", True)]
    full = tok.apply_chat_template(DEMO, tokenize=False)
    assert prompt + "".join(text for text, _ in pieces) == full.removesuffix("\n")
    with pytest.raises(DataError, match="no assistant turn"):
        conversation_pieces(tok, DEMO[:1])


class Replay:
    """An engine that replays a demonstration's assistant turns, to compare with what warmstart trains on."""

    def __init__(self, tok: Any, turns: list[str]) -> None:
        self.tok, self.turns = tok, iter(turns)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        ids = self.tok(next(self.turns) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        return [Completion(ids, [-1.0] * len(ids), "eos")]


def test_training_tokens_are_what_the_rollout_generates(tok: Any) -> None:
    """The batch's prompt, response and loss mask equal those of a multi-turn rollout that says the same."""
    batch = conversation_batch(tok, [DEMO, [DEMO[0], {"role": "assistant", "content": "287663"}]],
                               [Calculator().schema()])
    batch.validate()
    call_text = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "347*829"}}\n</tool_call>'
    rollout = run_turns(Replay(tok, [call_text, "287663"]), tok, [Prompt(messages=DEMO[:1])],
                        SamplingParams(n=1, max_new_tokens=200), [Calculator()], TurnOptions(max_turns=2))
    n = int(rollout.attention_mask[0].sum())
    assert batch.prompt_ids[0].tolist() == rollout.prompt_ids[0].tolist()
    assert batch.response_ids[0, :n].tolist() == rollout.response_ids[0, :n].tolist()
    assert batch.response_mask[0, :n].tolist() == rollout.response_mask[0, :n].tolist()
    assert int(batch.attention_mask[0].sum()) == n
    direct = tok("287663<|im_end|>", add_special_tokens=False)["input_ids"]
    assert batch.response_ids[1, :len(direct)].tolist() == direct and batch.attention_mask[1].sum() == len(direct)
    assert batch.prompts[0].messages == DEMO[:1]


def test_supervised_loss_is_the_mean_nll_of_the_masked_tokens() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -8.0, -8.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    inputs = LossInputs(logprobs=logprobs, advantages=torch.zeros(2, 3), mask=mask)
    value, metrics = SupervisedLoss()(inputs, LossNorm.of(mask, 3))
    assert value.item() == pytest.approx(3.5 / 3) and metrics["nll"].item() == pytest.approx(3.5 / 3)
    value.backward()
    assert torch.equal(logprobs.grad, -mask / 3)


def test_warmstart_command_trains_and_writes_a_model(tmp_path: Path) -> None:
    """A few steps on the tool-use recipe's demonstrations: the loss falls and OUT/model loads."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ws"
    args = ["warmstart", "--config", str(EXAMPLE), "--out", str(out), "--steps", "12", "--batch-size", "8",
            "--lr", "3e-3", "--set", "task.demo_tool_rate=1.0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert rows[-1]["nll"] < rows[0]["nll"] * 0.8
    result = json.loads((out / "warmstart.json").read_text())
    assert result["steps"] == 12 and result["examples"] == 96 and result["nll_end"] < result["nll_start"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["warmstart"] == {"steps": 12, "batch_size": 8} and config["backend"]["lr"] == 3e-3
    assert config["trainer"]["model"] == "embedded:tools" and config["task"]["demo_tool_rate"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert load_tokenizer(str(out / "model")).chat_template and model.config.vocab_size > 100
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "exists already" in again.output


def test_a_task_without_demonstrations_is_a_one_line_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["warmstart", "--task", "math", "--out", str(tmp_path / "ws"), "--steps", "1",
                                  "--set", f"task.path={EXAMPLE.parents[1] / 'data' / 'math'}"])
    assert r.exit_code == 2 and "offers no demonstrations" in r.output, r.output


def test_an_lr_schedule_spans_the_warm_start(tmp_path: Path) -> None:
    """A linear decay runs over --steps (not the recipe's trainer.steps, 40), one optimizer step per step."""
    out = tmp_path / "ws"
    r = CliRunner().invoke(main, ["warmstart", "--config", str(EXAMPLE), "--out", str(out), "--steps", "4",
                                  "--batch-size", "2", "--lr", "1e-3", "--set", "backend.lr_scheduler_type=linear"])
    assert r.exit_code == 0, r.output
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["steps"] == 4
