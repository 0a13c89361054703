"""Images through the hf rollout and the torch backend, on a tiny random Qwen2.5-VL built offline with the
real Qwen tokenizer and the real Geometry3K diagrams: the processor's inputs reach `generate` and the
batch, trainer logprobs equal the rollout's (3-D mrope positions, left padding, micro-batches), the update
trains the vision tower, and weights sync back into the rollout."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch
from PIL import Image

from rlcore import Prompt, RolloutBatch, SamplingParams, Tool, ToolResult, UpdatePlan
from rlcore.errors import RLCoreError
from rlcore.models import build_tiny_vl_model
from rlcore.testing.contracts import make_context
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.common.logprobs import position_ids, token_logprobs
from rlcore_backends.update.torch.backend import TorchBackend
from rlcore_backends.rollout.engine import Completion
from rlcore_backends.common.vision import cut_at_placeholders, load_processor, vision_inputs

from policy_losses import TokenMeanPG

REPO = Path(__file__).resolve().parents[2]
GEO = REPO / "examples" / "data" / "geo3k"
"""10 real Geometry3K problems with their diagrams (train.jsonl: 8, test.jsonl: 2)."""
QWEN3 = REPO / "tests" / "data" / "qwen3-tokenizer"


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return build_tiny_vl_model(tmp_path_factory.mktemp("vl") / "model", seed=0, tokenizer=str(QWEN3))


@pytest.fixture(scope="module")
def ctx(vl_dir, tmp_path_factory):
    return make_context(tmp_path_factory.mktemp("run"), vl_dir)


@pytest.fixture(scope="module")
def rollout(ctx) -> HFRollout:
    r = HFRollout(HFRollout.Options())
    r.setup(ctx=ctx)
    return r


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    """Three real problems; their texts and diagrams differ in size, so prompts are left-padded."""
    rows = [json.loads(line) for line in (GEO / "train.jsonl").read_text().splitlines()][:3]
    return [Prompt(messages=[{"role": "user", "content": [{"type": "image"},
                                                          {"type": "text", "text": r["problem_text"] * (i + 1)}]}],
                   answer=r["answer_value"], id=str(r["id"]), images=[Image.open(GEO / r["image"]).convert("RGB")])
            for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def batch(rollout, prompts) -> RolloutBatch:
    return rollout.sample(prompts, SamplingParams(n=2, max_new_tokens=12, temperature=1.0, seed=5), [], None)


def test_images_reach_the_processor_generate_and_the_batch(rollout, prompts, batch, vl_dir):
    batch.validate()
    config = rollout.model.config
    processor = load_processor(str(vl_dir), rollout.tokenizer)
    assert batch.multimodal is not None and len(batch.multimodal) == len(batch) == 6
    widths = set()
    for i in range(len(batch)):
        mm, prompt = batch.multimodal[i], prompts[i // 2]
        expected = processor.image_processor(images=prompt.images, return_tensors="pt")
        assert torch.equal(mm["image_grid_thw"], expected["image_grid_thw"])
        assert torch.equal(mm["pixel_values"], expected["pixel_values"])
        ids = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        widths.add(len(ids))
        patches = int(mm["image_grid_thw"].prod()) // 4
        assert int((ids == config.image_token_id).sum()) == patches, "one image token per merged patch"
        assert int((ids == config.vision_start_token_id).sum()) == 1
        assert not (batch.response_ids[i] == config.image_token_id).any(), "no image placeholder in a response"
    assert len(widths) == 3, "prompts of different lengths: real left padding"
    assert batch.response_lengths.min() > 0


def test_sampling_depends_on_the_image(rollout, prompts):
    """Greedy responses to the same text with two different diagrams differ: the pixels reach the model."""
    swapped = [Prompt(messages=prompts[0].messages, images=p.images, id=p.id) for p in prompts[:2]]
    out = rollout.sample(swapped, SamplingParams(n=1, max_new_tokens=12, temperature=0.0), [], None)
    assert not torch.equal(out.rollout_logprobs[0], out.rollout_logprobs[1])


def test_trainer_logprobs_equal_the_rollouts(ctx, batch):
    backend = TorchBackend(TorchBackend.Options())
    backend.setup(ctx=ctx)
    logp = backend.logprobs(batch, reference=False)
    mask = batch.attention_mask.bool()
    assert (logp - batch.rollout_logprobs)[mask].abs().max() < 1e-4
    # one sample per micro-batch gives the same (each micro-batch takes its own samples' images, in order)
    small = TorchBackend(TorchBackend.Options(micro_batch_tokens=1))
    small.setup(ctx=ctx)
    assert (small.logprobs(batch, reference=False) - logp)[mask].abs().max() < 1e-5
    # and a shuffled, split batch keeps each sample's images with it
    part = batch.select([5, 0, 3])
    assert (backend.logprobs(part, reference=False) - logp[[5, 0, 3]])[mask[[5, 0, 3]]].abs().max() < 1e-5
    assert [len(b.multimodal) for b in batch.split(4)] == [4, 2]


def test_text_positions_or_missing_images_would_not_match(rollout, batch):
    """The check above can fail: 1-D text positions, or no pixel values, give other logprobs."""
    model, (ids, mask) = rollout.model, batch.sequences()
    vision = vision_inputs(model, ids, batch.multimodal)
    R = batch.response_ids.shape[1]
    with torch.no_grad():
        text_pos = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **vision,
                         logits_to_keep=R + 1).logits[:, :-1]
    logp = token_logprobs(text_pos.float() / batch.temperature, batch.response_ids)
    m = batch.attention_mask.bool()
    assert (logp - batch.rollout_logprobs)[m].abs().max() > 1e-3


def test_update_trains_the_vision_tower_and_syncs_back(ctx, rollout, prompts):
    b = rollout.sample(prompts, SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=7), [], None)
    b.advantages = torch.randn(b.response_ids.shape, generator=torch.Generator().manual_seed(0)) * b.response_mask
    backend = TorchBackend(TorchBackend.Options(lr=1e-2))
    backend.setup(ctx=ctx)
    vision_before = {k: v.clone() for k, v in backend.model.state_dict().items() if "visual" in k}
    metrics = backend.update(b, TokenMeanPG(), UpdatePlan())
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
    after = backend.model.state_dict()
    assert any(not torch.equal(vision_before[k], after[k]) for k in vision_before), "the vision tower learns"
    rollout.sync_weights(backend.policy_weights())
    fresh = rollout.sample(prompts, SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=8), [], None)
    logp = backend.logprobs(fresh, reference=False)
    assert (logp - fresh.rollout_logprobs)[fresh.attention_mask.bool()].abs().max() < 1e-4, \
        "after the sync, rollout and trainer agree on the new weights"


def test_checkpoint_round_trip_keeps_the_vision_tower_and_processor(ctx, tmp_path, rollout, batch):
    """save_state writes a loadable VL model directory (image processor included); load_state restores every
    weight although transformers saves Qwen2.5-VL's weights under other names (`visual.*`)."""
    backend = TorchBackend(TorchBackend.Options(lr=1e-2))
    backend.setup(ctx=ctx)
    backend.update(attrs.evolve(batch, advantages=batch.response_mask.clone()), TokenMeanPG(), UpdatePlan())
    backend.save_state(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model" / "preprocessor_config.json").is_file()
    assert load_processor(str(tmp_path / "ckpt" / "model"), rollout.tokenizer).image_processor is not None
    fresh = TorchBackend(TorchBackend.Options(lr=1e-2))
    fresh.setup(ctx=ctx)
    trained = backend.model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in fresh.model.state_dict().items() if "visual" in k)
    fresh.load_state(tmp_path / "ckpt")
    restored = fresh.model.state_dict()
    assert trained.keys() == restored.keys() and all(torch.equal(trained[k], restored[k]) for k in trained)


def test_responses_end_before_an_image_placeholder(rollout):
    image = rollout.model.config.image_token_id
    done = [Completion([5, 6, image, 7], [-1.0, -2.0, -3.0, -4.0], "eos"), Completion([5, 6], [-1.0, -2.0], "length")]
    cut = cut_at_placeholders(rollout.model.config, done)
    assert (cut[0].token_ids, cut[0].logprobs, cut[0].finish_reason) == ([5, 6], [-1.0, -2.0], "stop")
    assert cut[1] == done[1]


class Echo(Tool):
    name = "echo"
    description = "Repeat the text."
    parameters = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}

    def execute(self, instance, arguments):
        return ToolResult(f"echo: {arguments['text']}")


class ScriptedVL:
    """Calls `echo` in the first turn of the samples whose image has `caller_patches` patches and answers
    directly otherwise; records the vision inputs each `generate` call gets for its rows."""

    def __init__(self, tok, caller_patches):
        self.tok, self.caller, self.seen = tok, caller_patches, []

    def generate(self, prompts, params, multimodal=None):
        self.seen.append([int(m["image_grid_thw"].prod()) for m in multimodal])
        out = []
        for ids, mm in zip(prompts, multimodal):
            turn = self.tok.decode(ids).count("<|im_start|>assistant") - 1
            calls = turn == 0 and int(mm["image_grid_thw"].prod()) == self.caller
            text = '<tool_call>\n{"name": "echo", "arguments": {"text": "hi"}}\n</tool_call>' if calls else "done"
            reply = self.tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
            out.append(Completion(reply, [-0.5] * len(reply), "eos"))
        return out


def test_multi_turn_tool_calls_keep_each_samples_images(rollout, prompts):
    """run_turns hands every generate call the vision inputs of exactly its rows, turn after turn."""
    from rlcore_backends.rollout.engine import TurnOptions, run_turns
    from rlcore_backends.common.vision import render_with_images

    processor = load_processor(rollout.spec_path, rollout.tokenizer)
    two = [prompts[0], prompts[2]]  # diagrams with different patch counts
    rendered = [render_with_images(processor, p, [Echo().schema()]) for p in two]
    sizes = [int(r[1]["image_grid_thw"].prod()) for r in rendered]
    assert sizes[0] != sizes[1]
    engine = ScriptedVL(rollout.tokenizer, caller_patches=sizes[1])
    batch = run_turns(engine, rollout.tokenizer, two, SamplingParams(n=2, max_new_tokens=64), [Echo()],
                      TurnOptions(max_turns=3), rendered=[r[0] for r in rendered], multimodal=[r[1] for r in rendered])
    assert engine.seen[0] == [sizes[0], sizes[0], sizes[1], sizes[1]]
    assert engine.seen[1] == [sizes[1], sizes[1]], "the second turn runs only the samples that called the tool"
    assert [i["tool_calls"] for i in batch.info] == [0, 0, 1, 1]
    assert [int(m["image_grid_thw"].prod()) for m in batch.multimodal] == [sizes[0]] * 2 + [sizes[1]] * 2
    assert "echo: hi" in rollout.tokenizer.decode(batch.response_ids[2])


def test_hf_rollout_runs_the_tool_loop_with_images(ctx, rollout, prompts):
    backend = TorchBackend(TorchBackend.Options())
    backend.setup(ctx=ctx)
    rollout.sync_weights(backend.policy_weights())  # the starting weights (an earlier test trained the rollout's)
    batch = rollout.sample(prompts, SamplingParams(n=2, max_new_tokens=10, temperature=1.0, seed=9), [Echo()], None)
    batch.validate()
    assert len(batch.multimodal) == 6 and all(i["turns"] >= 1 for i in batch.info)
    logp = backend.logprobs(batch, reference=False)
    m = batch.response_mask.bool()
    assert (logp - batch.rollout_logprobs)[m].abs().max() < 1e-4


def test_text_model_without_image_processor_gives_a_clear_error(tmp_path, prompts):
    from rlcore.testing.contracts import make_context as text_context

    r = HFRollout(HFRollout.Options())
    r.setup(ctx=text_context(tmp_path))
    with pytest.raises(RLCoreError, match="no image processor"):
        r.sample(prompts[:1], SamplingParams(n=1, max_new_tokens=4), [], None)
