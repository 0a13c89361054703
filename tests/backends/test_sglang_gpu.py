"""The sglang rollout on the real SGLang engine and server: sampled logprobs equal a Hugging Face forward
within 1e-3 before and after a weight update, for each way of syncing weights. Needs SGLang on CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlcore import Prompt, SamplingParams, Weights
from rlcore.config import build_options
from rlcore.models import build_tiny_model
from rlcore.testing import make_context
from rlcore_backends.rollout.sglang.server import HTTPClient, ServerProcess, free_port
from rlcore_backends.rollout.sglang.rollout import SGLangRollout

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is None or not torch.cuda.is_available(),
                                reason="needs SGLang on a CUDA GPU")

PROMPTS = [Prompt(messages=[{"role": "user", "content": c}], id=str(i))
           for i, c in enumerate(["1+2=", "12*34+5=", "7="])]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 with 64-dim attention heads, a size SGLang's attention kernels take."""
    return build_tiny_model(tmp_path_factory.mktemp("sglang") / "model", hidden=256, layers=2, heads=4)


def trained_copy(model_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, device="cuda"))
    return model


def max_logprob_error(batch, model: torch.nn.Module, temperature: float) -> float:  # noqa: ANN001
    worst = 0.0
    for i in range(len(batch)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i] == 1]
        n = int(batch.attention_mask[i].sum())
        ids = torch.cat([prompt, batch.response_ids[i, :n]])[None].cuda()
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1).cpu()
        worst = max(worst, float((batch.rollout_logprobs[i, :n] - expected).abs().max()))
    return worst


def check_sync(rollout: SGLangRollout, model_dir: Path) -> None:
    """Logprobs follow the checkpoint, then the pushed weights (which change them far beyond 1e-3)."""
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=12)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    batch = rollout.sample(prompts=PROMPTS, params=params, tools=[], interaction=None)
    batch.validate()
    assert max_logprob_error(batch, original, 0.8) < 1e-3
    trained = trained_copy(model_dir)
    metrics = rollout.sync_weights(weights=Weights(named_tensors=lambda: iter(trained.state_dict().items()),
                                                   version=1, module=trained))
    assert metrics["sync/megabytes"] > 0
    batch = rollout.sample(prompts=PROMPTS, params=params, tools=[], interaction=None)
    assert max_logprob_error(batch, trained, 0.8) < 1e-3
    assert max_logprob_error(batch, original, 0.8) > 1e-2, "the update changed the engine's logprobs"
    greedy = rollout.sample(prompts=PROMPTS, params=SamplingParams(n=2, temperature=0.0, max_new_tokens=8), tools=[], interaction=None)
    assert torch.equal(greedy.response_ids[0::2], greedy.response_ids[1::2])
    assert max_logprob_error(greedy, trained, 1.0) < 1e-3


@pytest.mark.parametrize("options", [
    {"mode": "engine", "sync": "tensor", "release_memory_between_steps": True},
    {"mode": "engine", "sync": "disk"},
    {"mode": "server", "sync": "tensor"},
    {"mode": "server", "sync": "disk", "release_memory_between_steps": True},
])
def test_logprobs_match_hf_after_weight_update(tmp_path: Path, model_dir: Path, options: dict) -> None:
    ctx = make_context(tmp_path, model_dir, hardware="cuda")
    rollout = SGLangRollout(build_options(SGLangRollout.Options, {"dtype": "float32", "mem_fraction_static": 0.3,
                                                                  "timeout": 300, **options}, "rollout"))
    try:
        rollout.setup(ctx=ctx)
        check_sync(rollout, model_dir)
    finally:
        rollout.teardown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the disaggregated sync needs a second GPU for the server")
def test_distributed_sync_to_a_server_on_another_gpu(tmp_path: Path, model_dir: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--base-gpu-id", "1", "--dtype", "float32", "--mem-fraction-static", "0.3"]
    server = ServerProcess(command, tmp_path / "server.log")
    try:
        server.wait_ready(HTTPClient(f"http://127.0.0.1:{port}", 60), timeout=300)
        ctx = make_context(tmp_path, model_dir, hardware="cuda")
        rollout = SGLangRollout(build_options(SGLangRollout.Options, {
            "mode": "server", "url": f"http://127.0.0.1:{port}", "sync": "distributed", "timeout": 300}, "rollout"))
        try:
            rollout.setup(ctx=ctx)
            check_sync(rollout, model_dir)
        finally:
            rollout.teardown()
    finally:
        server.stop()
