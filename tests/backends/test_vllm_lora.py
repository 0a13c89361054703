"""The lora backend syncing into a real vLLM engine, both ways: merged full weights and adapter-only (vLLM's
LoRA serving). After each sync vLLM's logprobs must equal the trainer's own on the trained policy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from policy_losses import TokenMeanPG
from rlcore import Prompt, RolloutBatch, SamplingParams, UpdatePlan
from rlcore.context import RunContext
from rlcore.errors import RLCoreError
from rlcore.testing import make_context

pytest.importorskip("vllm", reason="the vllm extra is not installed (pip install 'rlcore-backends[vllm]')")
pytest.importorskip("peft", reason="the lora extra is not installed")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

from rlcore_backends.update.lora.backend import LoRABackend  # noqa: E402
from rlcore_backends.rollout.vllm.rollout import VLLMRollout, adapter_sync_rank, vllm_lora_rank  # noqa: E402
from test_vllm import build_qwen  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    root = tmp_path_factory.mktemp("vllm-lora")
    ctx = make_context(root / "run", build_qwen(root / "model"), seed=0)
    ctx.config = {"plugins": {"backend": "lora", "rollout": "vllm"}, "backend": {"sync": "adapter", "rank": 4}}
    return ctx


@pytest.fixture(scope="module")
def rollout(ctx: RunContext) -> Iterator[VLLMRollout]:
    """One engine; LoRA is switched on by the run's config (lora backend, sync: adapter)."""
    r = VLLMRollout(VLLMRollout.Options(max_model_len=1024, kv_cache_gib=1))
    r.setup(ctx=ctx)
    yield r
    r.teardown()


@pytest.fixture(scope="module")
def backend(ctx: RunContext) -> LoRABackend:
    torch.manual_seed(0)
    b = LoRABackend(LoRABackend.Options(lr=2e-2, rank=4, alpha=8.0, sync="adapter"))
    b.setup(ctx=ctx)
    return b


def sample(rollout: VLLMRollout, seed: int) -> RolloutBatch:
    prompts = [Prompt(messages=[{"role": "user", "content": c}], id=str(i))
               for i, c in enumerate(["What is 2+3?", "Name a colour.", "Tell me a story about a fox. " * 20])]
    return rollout.sample(prompts=prompts, params=SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=seed),
                          tools=[], interaction=None)


def train(backend: LoRABackend, batch: RolloutBatch, steps: int) -> None:
    batch.old_logprobs = batch.rollout_logprobs
    batch.advantages = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(steps)) \
        * batch.response_mask
    for _ in range(steps):
        backend.update(batch=batch, loss=TokenMeanPG(), plan=UpdatePlan())


def assert_matches_trainer(backend: LoRABackend, batch: RolloutBatch) -> float:
    """vLLM's logprobs equal the trainer's policy's; returns how far the policy is from the frozen base."""
    mask = batch.attention_mask.bool()
    policy = backend.logprobs(batch=batch, reference=False)
    torch.testing.assert_close(batch.rollout_logprobs[mask], policy[mask], atol=ATOL, rtol=0)
    base = backend.logprobs(batch=batch, reference=True)
    return float((policy[mask] - base[mask]).abs().max())


def test_rank_from_the_run_config() -> None:
    assert adapter_sync_rank({"plugins": {"backend": "lora"}, "backend": {"sync": "adapter", "rank": 24}}) == 24
    assert adapter_sync_rank({"plugins": {"backend": "lora"}, "backend": {"sync": "merged", "rank": 24}}) == 0
    assert adapter_sync_rank({"plugins": {"backend": "torch"}, "backend": {}}) == 0
    assert [vllm_lora_rank(r) for r in (1, 4, 16, 17, 300)] == [1, 8, 16, 32, 320]


def test_adapter_then_merged_sync_match_the_trainer(rollout: VLLMRollout, backend: LoRABackend) -> None:
    assert rollout.engine.lora_enabled
    train(backend, sample(rollout, seed=1), steps=2)

    weights = backend.policy_weights()
    assert weights.adapter and all(".lora_" in name for name, _ in weights.named_tensors())
    metrics = rollout.sync_weights(weights=weights)
    assert 0 < metrics["sync/engine_seconds"] <= metrics["sync/seconds"]
    assert assert_matches_trainer(backend, sample(rollout, seed=2)) > 1e-3, "the adapters did not change the policy"

    # A second adapter sync replaces the first (vLLM would otherwise keep serving the old one).
    train(backend, sample(rollout, seed=3), steps=1)
    rollout.sync_weights(weights=backend.adapter_weights())
    assert rollout.engine.lora is not None and rollout.engine.lora.lora_int_id == 2
    assert sorted(p.name for p in rollout.engine.adapters.root.iterdir()) == ["v2"]
    assert_matches_trainer(backend, sample(rollout, seed=4))

    # Merged full weights replace the base and drop the adapter (applying it again would count it twice).
    rollout.sync_weights(weights=backend.merged_weights())
    assert rollout.engine.lora is None
    assert assert_matches_trainer(backend, sample(rollout, seed=5)) > 1e-3


def test_server_mode_adapter_sync(tmp_path: Path, backend: LoRABackend) -> None:
    """A LoRA-enabled server started here: adapters load through /v1/load_lora_adapter and requests ask for
    them by name; a merged sync goes back to the base name."""
    ctx = make_context(tmp_path / "run", build_qwen(tmp_path / "model"), seed=0)
    rollout = VLLMRollout(VLLMRollout.Options(mode="server", max_model_len=1024, max_lora_rank=4))
    rollout.setup(ctx=ctx)
    try:
        assert rollout.engine.lora_enabled
        rollout.sync_weights(weights=backend.adapter_weights())
        rollout.sync_weights(weights=backend.adapter_weights())  # the second replaces the first
        assert rollout.engine.model == rollout.engine.adapter_name == "rlcore-2"
        assert assert_matches_trainer(backend, sample(rollout, seed=6)) > 1e-3
        rollout.sync_weights(weights=backend.merged_weights())
        assert rollout.engine.adapter_name is None
        assert_matches_trainer(backend, sample(rollout, seed=7))
    finally:
        rollout.teardown()


def test_adapter_sync_to_a_server_by_url_is_refused(tmp_path: Path) -> None:
    ctx = make_context(tmp_path / "run", build_qwen(tmp_path / "model"), seed=0)
    rollout = VLLMRollout(VLLMRollout.Options(mode="server", url="http://127.0.0.1:9", max_lora_rank=8))
    with pytest.raises(RLCoreError, match="adapter sync .* needs a vLLM server that rlcore starts"):
        rollout.setup(ctx=ctx)
