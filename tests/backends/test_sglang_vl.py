"""Images through the sglang rollout, on SGLang's API doubles (SGLang cannot run here; see sglang_fake.py):
`image_data` next to the expanded token ids, PIL images through `sglang.Engine`, PNG data URLs over HTTP,
in every turn of the tool loop. The Engine double generates with the real tiny Qwen2.5-VL from the images it
receives (its processor, as SGLang's would), so the trainer's logprobs must equal the rollout's."""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest
from sglang_fake import FakeEngine, FakeServer
from vision_prompts import Echo, diagram_prompts

from rlcore import Prompt, SamplingParams
from rlcore.config import build_options
from rlcore.context import RunContext
from rlcore.errors import DataError
from rlcore.models import build_tiny_vl_model
from rlcore.testing import make_context
from rlcore_backends.common.vision import ENGINE_IMAGES, load_processor, render_with_images
from rlcore_backends.rollout.sglang import engines as sglang_engine
from rlcore_backends.rollout.sglang.api import generate_request
from rlcore_backends.rollout.sglang.rollout import SGLangRollout
from rlcore_backends.update.torch.backend import TorchBackend


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    root = tmp_path_factory.mktemp("sglang-vl")
    return make_context(root / "run", build_tiny_vl_model(root / "model", seed=0))


@pytest.fixture
def engine_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sglang_engine, "import_sglang", lambda: types.SimpleNamespace(Engine=FakeEngine))


def make(ctx: RunContext, **options: object) -> SGLangRollout:
    rollout = SGLangRollout(build_options(SGLangRollout.Options, options, "rollout"))
    rollout.setup(ctx=ctx)
    return rollout


def fitted(ctx: RunContext, count: int = 3) -> list[list]:
    """Each prompt's images as the rollout sends them: resized to the size the model's processor gives them."""
    processor = load_processor(ctx.model.path, ctx.model.tokenizer)
    return [render_with_images(processor, p, for_engine=True)[1][ENGINE_IMAGES] for p in diagram_prompts(count)]


def test_engine_gets_image_data_and_the_trainer_agrees(ctx: RunContext, engine_mode: None) -> None:
    rollout = make(ctx)
    batch = rollout.sample(prompts=diagram_prompts(), params=SamplingParams(n=2, max_new_tokens=8, seed=2), tools=[], interaction=None)
    batch.validate()
    engine = FakeEngine.instances[-1]
    (name, body), = engine.calls
    expected = fitted(ctx)
    assert name == "generate" and len(body["image_data"]) == 6
    for row, images in zip(body["image_data"], [x for x in expected for _ in range(2)]):
        assert [i.tobytes() for i in row] == [i.tobytes() for i in images]
    assert [int(m["image_grid_thw"].prod()) for m in batch.multimodal] == \
        [int(m["image_grid_thw"].prod()) for m in batch.multimodal[::2] for _ in range(2)]
    trainer = TorchBackend(TorchBackend.Options())
    trainer.setup(ctx=ctx)
    mask = batch.attention_mask.bool()
    assert (trainer.logprobs(batch=batch, reference=False) - batch.rollout_logprobs)[mask].abs().max() < 1e-4
    rollout.teardown()


def test_every_turn_of_the_tool_loop_sends_its_rows_images(ctx: RunContext, engine_mode: None) -> None:
    rollout = make(ctx, max_turns=3)
    batch = rollout.sample(prompts=diagram_prompts(2), params=SamplingParams(n=2, max_new_tokens=12, seed=3),
                           tools=[Echo()], interaction=None)
    batch.validate()
    for _, body in FakeEngine.instances[-1].calls:
        assert len(body["image_data"]) == len(body["input_ids"]) and all(len(r) == 1 for r in body["image_data"])
    assert all(i["turns"] >= 1 for i in batch.info) and len(batch.multimodal) == 4
    rollout.teardown()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server
    assert server.violations == []


def test_server_gets_the_images_as_data_urls(ctx: RunContext, fake: FakeServer) -> None:
    rollout = make(ctx, mode="server", url=fake.url)
    batch = rollout.sample(prompts=diagram_prompts(), params=SamplingParams(n=2, max_new_tokens=3), tools=[], interaction=None)
    batch.validate()
    body, = fake.bodies("/generate")
    assert all(item.startswith("data:image/png;base64,") for row in body["image_data"] for item in row)
    expected = [x for x in fitted(ctx) for _ in range(2)]
    assert [[i.tobytes() for i in row] for row in fake.images] == [[i.tobytes() for i in row] for row in expected], \
        "the server decodes exactly the pixels the trainer's processor read"
    text = rollout.sample(prompts=[Prompt(messages=[{"role": "user", "content": "hi"}])],
                          params=SamplingParams(n=1, max_new_tokens=2), tools=[], interaction=None)
    assert text.multimodal is None and "image_data" not in fake.bodies("/generate")[-1]
    rollout.teardown()


def test_image_data_needs_one_list_per_prompt() -> None:
    params = SamplingParams(n=1, max_new_tokens=2)
    assert generate_request([[1, 2], [3]], params, [["a"], []])["image_data"] == [["a"], []]
    with pytest.raises(DataError, match="one image list per prompt: 2 prompts, 1 lists"):
        generate_request([[1, 2], [3]], params, [["a"]])
