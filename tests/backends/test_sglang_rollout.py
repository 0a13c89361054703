"""The `sglang` rollout plugin end to end on CPU, through SGLang's API doubles (SGLang cannot run here):
offline mode on `FakeEngine` (sglang.Engine's signatures over the real tiny model), server mode on the
fake HTTP server (given by URL, or launched and stopped by the plugin), and the distributed weight sync
as a real gloo broadcast to a fake server process that joins the group as SGLang's TP ranks do."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sglang_fake import TESTS_DIR, FakeEngine, FakeServer, alive, fake_sglang_package, pickle_serializer
from transformers import AutoModelForCausalLM

from rlcore import Prompt, SamplingParams, Weights
from rlcore.config import build_options
from rlcore.context import RunContext
from rlcore.errors import ConfigError, RLCoreError
from rlcore.testing import check_rollout
from rlcore_backends.rollout.sglang import engines as sglang_engine
from rlcore_backends.rollout.sglang import sync as sglang_sync
from rlcore_backends.rollout.sglang.api import SGLangError
from rlcore_backends.rollout.sglang.server import HTTPClient, free_port
from rlcore_backends.rollout.sglang.rollout import SGLangRollout


@pytest.fixture
def fake_sglang_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import sglang` answers a module whose `Engine` is the schema double."""
    monkeypatch.setattr(sglang_engine, "import_sglang", lambda: types.SimpleNamespace(Engine=FakeEngine))


def make(ctx: RunContext, **options: object) -> SGLangRollout:
    rollout = SGLangRollout(build_options(SGLangRollout.Options, options, "rollout"))
    rollout.setup(ctx=ctx)
    return rollout


def perturbed(model_dir: Path, seed: int = 1) -> torch.nn.Module:
    """The tiny model with every weight moved, as a trainer's update would."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def weights_of(model: torch.nn.Module) -> Weights:
    return Weights(named_tensors=lambda: iter(model.state_dict().items()), version=1)


def assert_logprobs_match(batch, model: torch.nn.Module, temperature: float) -> None:  # noqa: ANN001
    for i in range(len(batch)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i] == 1]
        n = int(batch.attention_mask[i].sum())
        ids = torch.cat([prompt, batch.response_ids[i, :n]])[None]
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1] / temperature
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
        torch.testing.assert_close(batch.rollout_logprobs[i, :n], expected, atol=1e-5, rtol=0)


PROMPTS = [Prompt(messages=[{"role": "user", "content": c}], id=str(i)) for i, c in enumerate(["1+2=", "12*3="])]


# ---- offline engine mode -------------------------------------------------------------------------

def test_contract(rlcore_context: RunContext, fake_sglang_module: None) -> None:
    rollout = SGLangRollout(SGLangRollout.Options())
    check_rollout(rollout, rlcore_context)
    rollout.teardown()


def test_engine_is_started_with_server_args(rlcore_context: RunContext, fake_sglang_module: None) -> None:
    rollout = make(rlcore_context, tp_size=1, mem_fraction_static=0.3, dtype="float32",
                   release_memory_between_steps=True)
    assert FakeEngine.instances[-1].kwargs == {
        "model_path": rlcore_context.model.path, "tp_size": 1, "mem_fraction_static": 0.3, "dtype": "float32",
        "random_seed": rlcore_context.seed, "enable_memory_saver": True}
    engine = FakeEngine.instances[-1]
    rollout.teardown()
    assert engine.shut_down and rollout.engine is None


def test_n_samples_and_logprobs_match_the_model(rlcore_context: RunContext, fake_sglang_module: None,
                                               rlcore_tiny_model: Path) -> None:
    rollout = make(rlcore_context)
    batch = rollout.sample(prompts=PROMPTS, params=SamplingParams(n=3, temperature=0.7, max_new_tokens=6, seed=2),
                           tools=[], interaction=None)
    batch.validate()
    [(_, body)] = [c for c in FakeEngine.instances[-1].calls if c[0] == "generate"]
    rows = body["input_ids"]
    assert len(rows) == 6 and rows[0] == rows[1] == rows[2] and rows[3] == rows[4] == rows[5] != rows[0]
    assert [sp["sampling_seed"] for sp in body["sampling_params"]] == [2, 3, 4, 5, 6, 7]
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1] and batch.temperature == 0.7
    assert {i["finish_reason"] for i in batch.info} <= {"eos", "length"}
    assert_logprobs_match(batch, AutoModelForCausalLM.from_pretrained(rlcore_tiny_model, dtype=torch.float32), 0.7)
    rollout.teardown()


def test_stop_strings_are_mapped(rlcore_context: RunContext, fake_sglang_module: None) -> None:
    rollout = make(rlcore_context)
    free = rollout.sample(prompts=PROMPTS, params=SamplingParams(n=2, temperature=0.0, max_new_tokens=8), tools=[], interaction=None)
    text = free.texts[0]
    assert len(text) >= 2, "the greedy answer needs two characters to stop on the second"
    batch = rollout.sample(prompts=PROMPTS, params=SamplingParams(n=2, temperature=0.0, max_new_tokens=8,
                                                                  stop=[text[1]]), tools=[], interaction=None)
    assert batch.info[0]["finish_reason"] == "stop" and batch.texts[0].endswith(text[1])
    rollout.teardown()


@pytest.mark.parametrize("sync", ["tensor", "disk"])
def test_synced_weights_drive_the_logprobs(rlcore_context: RunContext, fake_sglang_module: None,
                                           rlcore_tiny_model: Path, sync: str) -> None:
    rollout = make(rlcore_context, sync=sync)
    trained = perturbed(rlcore_tiny_model)
    metrics = rollout.sync_weights(weights=weights_of(trained))
    assert metrics["sync/seconds"] >= 0 and metrics["sync/buckets"] == 1
    assert metrics["sync/megabytes"] == pytest.approx(sum(t.numel() * 4 for t in trained.state_dict().values()) / 2**20)
    names = [c for c in FakeEngine.instances[-1].calls if c[0].startswith("update_weights")]
    if sync == "tensor":
        assert names == [("update_weights_from_tensor", list(trained.state_dict()))]
    else:
        assert names == [("update_weights_from_disk", str((rlcore_context.run_dir / "sglang_weights").resolve()))]
        assert (rlcore_context.run_dir / "sglang_weights" / "config.json").is_file()
    assert FakeEngine.instances[-1].calls[-1][0] == "flush_cache"
    batch = rollout.sample(prompts=PROMPTS, params=SamplingParams(n=2, temperature=1.0, max_new_tokens=6), tools=[], interaction=None)
    assert_logprobs_match(batch, trained, 1.0)
    rollout.teardown()


def test_dtype_casts_synced_weights(rlcore_context: RunContext, fake_sglang_module: None,
                                    rlcore_tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rollout = make(rlcore_context, dtype="bfloat16")
    sent: list[torch.dtype] = []
    monkeypatch.setattr(FakeEngine, "update_weights_from_tensor",
                        lambda self, named_tensors, load_format=None, flush_cache=True:
                        sent.extend(t.dtype for _, t in named_tensors))
    rollout.sync_weights(weights=weights_of(perturbed(rlcore_tiny_model)))
    assert sent and set(sent) == {torch.bfloat16}
    rollout.teardown()


def test_release_and_resume_around_updates(rlcore_context: RunContext, fake_sglang_module: None,
                                           rlcore_tiny_model: Path) -> None:
    rollout = make(rlcore_context, release_memory_between_steps=True)
    engine = FakeEngine.instances[-1]
    params = SamplingParams(n=1, max_new_tokens=3)
    rollout.sample(prompts=PROMPTS, params=params, tools=[], interaction=None)
    assert engine.calls[-1] == ("release_memory_occupation", ["weights", "kv_cache"]) and engine.released
    engine.calls.clear()
    trained = perturbed(rlcore_tiny_model)
    rollout.sync_weights(weights=weights_of(trained))
    assert [c[0] if c[0] != "resume_memory_occupation" else c for c in engine.calls] == [
        ("resume_memory_occupation", ["weights"]), "update_weights_from_tensor",
        ("resume_memory_occupation", ["kv_cache"]), "flush_cache"]
    assert not engine.released
    rollout.sample(prompts=PROMPTS, params=params, tools=[], interaction=None)
    engine.calls.clear()
    batch = rollout.sample(prompts=PROMPTS, params=params, tools=[], interaction=None)  # again, before any new weights
    assert [c[0] for c in engine.calls] == ["resume_memory_occupation", "update_weights_from_tensor",
                                            "resume_memory_occupation", "flush_cache", "generate",
                                            "release_memory_occupation"]
    assert_logprobs_match(batch, trained, 1.0)
    rollout.teardown()


def test_sampling_again_before_any_sync_reloads_the_checkpoint(rlcore_context: RunContext,
                                                               fake_sglang_module: None) -> None:
    rollout = make(rlcore_context, release_memory_between_steps=True)
    engine = FakeEngine.instances[-1]
    rollout.sample(prompts=PROMPTS, params=SamplingParams(n=1, max_new_tokens=2), tools=[], interaction=None)
    rollout.sample(prompts=PROMPTS, params=SamplingParams(n=1, max_new_tokens=2), tools=[], interaction=None)
    assert ("update_weights_from_disk", rlcore_context.model.path) in engine.calls
    rollout.teardown()


def test_clear_errors(rlcore_context: RunContext, fake_sglang_module: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="mode='server'"):
        build_options(SGLangRollout.Options, {"sync": "distributed"}, "rollout")
    with pytest.raises(ConfigError, match="url is for mode='server'"):
        build_options(SGLangRollout.Options, {"url": "http://x:1"}, "rollout")
    with pytest.raises(ConfigError, match="rollout.sync: expected one of"):
        build_options(SGLangRollout.Options, {"sync": "nccl"}, "rollout")
    rollout = make(rlcore_context)
    with pytest.raises(RLCoreError, match="full weights only"):
        rollout.sync_weights(weights=Weights(named_tensors=lambda: iter([]), adapter=True))
    with pytest.raises(RLCoreError, match="images"):
        rollout.sample(prompts=[Prompt(messages=[{"role": "user", "content": "?"}], images=["a.png"])],
                       params=SamplingParams(), tools=[], interaction=None)
    rollout.teardown()
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "True")
    with pytest.raises(ConfigError, match="SGLANG_RETURN_ORIGINAL_LOGPROB makes SGLang report logprobs before"):
        make(rlcore_context)


def test_missing_sglang_names_the_extra(rlcore_context: RunContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sglang", None)  # what an environment without SGLang imports
    with pytest.raises(RLCoreError, match=r"pip install 'rlcore-backends\[sglang\]'"):
        make(rlcore_context)


# ---- server mode ---------------------------------------------------------------------------------

@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server
    assert server.violations == []


def test_server_by_url(rlcore_context: RunContext, fake: FakeServer, monkeypatch: pytest.MonkeyPatch,
                       rlcore_tiny_model: Path) -> None:
    monkeypatch.setattr(sglang_engine, "tensor_serializer", lambda: pickle_serializer)
    rollout = make(rlcore_context, mode="server", url=fake.url, release_memory_between_steps=True, tp_size=2)
    batch = rollout.sample(prompts=PROMPTS, params=SamplingParams(n=2, max_new_tokens=3), tools=[], interaction=None)
    batch.validate()
    assert batch.group_ids.tolist() == [0, 0, 1, 1] and batch.response_ids.shape == (4, 3)
    rollout.sync_weights(weights=weights_of(perturbed(rlcore_tiny_model)))
    assert [e for e, _ in fake.requests] == [
        "/generate", "/release_memory_occupation", "/resume_memory_occupation", "/update_weights_from_tensor",
        "/resume_memory_occupation", "/flush_cache"]
    assert [len(b["serialized_named_tensors"]) for b in fake.bodies("/update_weights_from_tensor")] == [2]
    rollout.teardown()
    assert fake.requests[-1][0] == "/flush_cache", "a server given by URL is left running"


def test_server_by_url_must_be_reachable_and_healthy(rlcore_context: RunContext, fake: FakeServer) -> None:
    fake.health = 503
    with pytest.raises(SGLangError, match=r"not healthy \(GET /health answered HTTP 503\)"):
        make(rlcore_context, mode="server", url=fake.url)
    with pytest.raises(SGLangError, match="cannot reach the SGLang server at http://127.0.0.1:"):
        make(rlcore_context, mode="server", url=f"http://127.0.0.1:{free_port()}")


def test_launched_server_lifecycle(rlcore_context: RunContext, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = fake_sglang_package(tmp_path / "fake_pkg", TESTS_DIR)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_SGLANG_CHILD_PID_FILE", str(tmp_path / "child.pid"))
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")  # not passed on to the server rlcore launches
    rollout = make(rlcore_context, mode="server", sync="disk", timeout=60)
    process = rollout.engine.process
    batch = rollout.sample(prompts=PROMPTS, params=SamplingParams(n=2, max_new_tokens=2), tools=[], interaction=None)
    assert len(batch) == 4
    child = int((tmp_path / "child.pid").read_text())
    env = Path(f"/proc/{process.process.pid}/environ").read_bytes().split(b"\0")
    assert not any(v.startswith(b"SGLANG_RETURN_ORIGINAL_LOGPROB=") for v in env)
    rollout.teardown()
    assert process.process.returncode is not None and not alive(child)
    assert "fake sglang server" in (rlcore_context.run_dir / "sglang_server.log").read_text()


def torch_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                timeout: object) -> object:
    """Test stand-in for SGLang's `init_custom_process_group`: the default group of this process."""
    torch.distributed.init_process_group(backend=backend, init_method=init_method, world_size=world_size,
                                         rank=rank, timeout=timeout)
    return torch.distributed.group.WORLD


def test_distributed_sync_broadcasts_to_the_server_ranks(rlcore_context: RunContext, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         rlcore_tiny_model: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {TESTS_DIR!r}); from sglang_fake import "
         "launch_server_main; launch_server_main()", "--model-path", str(rlcore_tiny_model), "--port", str(port),
         "--group"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "FAKE_SGLANG_CHILD_PID_FILE"})
    monkeypatch.setattr(sglang_sync, "sglang_process_group", lambda: torch_group)
    url = f"http://127.0.0.1:{port}"
    try:
        client = HTTPClient(url, 30.0)
        for _ in range(200):
            try:
                if client.get("/health", timeout=1) == 200:
                    break
            except SGLangError:
                pass  # not listening yet
            time.sleep(0.1)
        rollout = make(rlcore_context, mode="server", url=url, sync="distributed", timeout=60)
        rollout.sync.bucket_bytes = 64 << 10  # several buckets from the tiny model (bucket_mb is at least 1)
        trained = perturbed(rlcore_tiny_model)
        metrics = rollout.sync_weights(weights=weights_of(trained))
        assert metrics["sync/buckets"] > 1
        received = client.post("/debug/received")
        expected = {n: float(t.double().sum()) for n, t in trained.state_dict().items()}
        assert list(received) == list(expected), "every tensor received, in the order announced"
        assert all(abs(received[n] - expected[n]) < 1e-6 * max(1.0, abs(expected[n])) for n in expected)
        rollout.teardown()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        server.kill()
        server.wait()


def test_refused_group_fails_fast(rlcore_context: RunContext, fake: FakeServer, monkeypatch: pytest.MonkeyPatch,
                                  rlcore_tiny_model: Path) -> None:
    release = threading.Event()
    monkeypatch.setattr(sglang_sync, "sglang_process_group", lambda: lambda **kwargs: release.wait(60))
    fake.fail("/init_weights_update_group", 400, {"success": False, "message": "Failed to init process group"})
    rollout = make(rlcore_context, mode="server", url=fake.url, sync="distributed", timeout=60)
    start = time.monotonic()
    with pytest.raises(SGLangError, match="/init_weights_update_group answered HTTP 400: Failed to init process group"):
        rollout.sync_weights(weights=weights_of(perturbed(rlcore_tiny_model)))
    assert time.monotonic() - start < 10, "no wait for the rendezvous timeout"
    release.set()
    rollout.teardown()
