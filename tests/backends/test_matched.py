"""`bfloat16_matched`: bfloat16 matmuls in row-invariant chunks, so the hf rollout and the torch trainer agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlcore import Prompt, RolloutBatch, SamplingParams
from rlcore.config import build_options
from rlcore.errors import ConfigError
from rlcore.models import build_tiny_model
from rlcore.testing.contracts import make_context
from rlcore_backends.common import matched
from rlcore_backends.common.matched import MatchedLinear, invariant_chunk, linear_shapes, match
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.update.fsdp.backend import FSDPBackend
from rlcore_backends.update.lora.backend import LoRABackend
from rlcore_backends.update.torch.backend import TorchBackend


def chunked_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk: int) -> torch.Tensor:
    """What `MatchedLinear` must compute: bf16 products over inner chunks, summed in float32, plus the bias."""
    parts = [x[:, s:s + chunk].bfloat16() @ weight[:, s:s + chunk].bfloat16().T for s in range(0, x.shape[1], chunk)]
    return sum(p.float() for p in parts) + bias


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2 with an MLP inner dimension of 1536 (SmolLM2's), 4 layers: enough for bf16 noise to grow."""
    return build_tiny_model(tmp_path_factory.mktemp("matched") / "model", hidden=384, layers=4, heads=6)


def build_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_matched_linear_runs_bf16_chunks_summed_in_fp32_and_trains_the_fp32_weight() -> None:
    torch.manual_seed(0)
    layer = MatchedLinear(300, 20)
    layer.chunk = 128
    x = torch.randn(7, 300)
    out = layer(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, chunked_reference(x, layer.weight, layer.bias, 128))
    assert not torch.allclose(out, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=0)
    out.sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(20, 300), atol=0.05, rtol=0.01)
    torch.testing.assert_close(layer.bias.grad, torch.full((20,), 7.0))


def test_cached_bf16_weight_follows_in_place_writes() -> None:
    torch.manual_seed(0)
    layer = MatchedLinear(64, 8, bias=False).requires_grad_(False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = layer(x)
        assert layer._cached is not None
        layer.weight.copy_(torch.randn(8, 64))  # a weight sync writes in place
        after = layer(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, chunked_reference(x, layer.weight, torch.zeros(8), layer.chunk))


def test_the_chosen_chunk_gives_each_row_its_bits_however_many_rows_a_call_holds(model_dir: Path) -> None:
    model = build_model(model_dir)
    shapes = tuple(linear_shapes(model))
    assert (1536, 384) in shapes  # the MLP's down projection: a long inner dimension is the risk
    chunk = invariant_chunk(shapes)
    if chunk is None:  # this machine's kernels: match refuses (the backends make that a ConfigError, tested below)
        with pytest.raises(ValueError, match="at every inner-dimension chunk down to 64"):
            match(model)
        return
    torch.manual_seed(1)  # other weights and rows than the probe's
    for inner, outer in shapes:
        layer = MatchedLinear(inner, outer, bias=False).requires_grad_(False)
        layer.chunk = chunk
        rows = torch.randn(300, inner)
        with torch.no_grad():
            alone = torch.cat([layer(rows[i:i + 1]) for i in range(40)])
            for n in (3, 17, 40, 300):
                assert torch.equal(layer(rows[:n])[:40], alone[:n]), (inner, outer, chunk, n)


def sample(tmp_path: Path, model_dir: Path, dtype: str) -> RolloutBatch:
    rollout = HFRollout(HFRollout.Options(dtype=dtype))
    rollout.setup(ctx=make_context(tmp_path, model_dir))
    prompts = [Prompt(messages=[{"role": "user", "content": c}], answer="", id=str(i))
               for i, c in enumerate(["1+2=", "12*34+5=", "7=", "100-99="])]
    return rollout.sample(prompts=prompts, params=SamplingParams(n=3, max_new_tokens=24, seed=3), tools=[],
                          interaction=None)


def gap(tmp_path: Path, model_dir: Path, batch: RolloutBatch, dtype: str) -> float:
    """Mean |trainer - rollout| logprob over the response tokens, the trainer a torch backend in `dtype`."""
    backend = TorchBackend(TorchBackend.Options(dtype=dtype))
    backend.setup(ctx=make_context(tmp_path, model_dir))
    diff = backend.logprobs(batch=batch, reference=False) - batch.rollout_logprobs
    return diff[batch.response_mask.bool()].abs().mean().item()


def test_rollout_and_trainer_agree_in_bfloat16_matched_as_in_float32(tmp_path: Path, model_dir: Path) -> None:
    if invariant_chunk(tuple(linear_shapes(build_model(model_dir)))) is None:
        with pytest.raises(ConfigError, match="bfloat16_matched: .*; use float32 here"):
            sample(tmp_path, model_dir, "bfloat16_matched")
        return
    batch = sample(tmp_path, model_dir, "bfloat16_matched")
    assert gap(tmp_path, model_dir, batch, "bfloat16_matched") < 1e-5
    # it does compute in bfloat16: a float32 trainer reads other logprobs
    assert gap(tmp_path, model_dir, batch, "float32") > 1e-4
    # and plain bfloat16 on both sides does not agree (what `matched` is for)
    plain = sample(tmp_path, model_dir, "bfloat16")
    assert gap(tmp_path, model_dir, plain, "bfloat16") > 1e-4


def test_matched_model_decodes_what_its_full_forward_computes(model_dir: Path) -> None:
    from transformers import DynamicCache

    model = build_model(model_dir).eval()
    try:
        match(model)
    except ValueError:
        pytest.skip("no row-invariant bf16 chunk on this machine (the ConfigError path is tested above)")
    ids = torch.randint(3, model.config.vocab_size, (3, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(8, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=0)


def test_no_invariant_chunk_is_one_config_error(tmp_path: Path, model_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matched, "invariant_chunk", lambda shapes: None)
    backend = TorchBackend(TorchBackend.Options(dtype="bfloat16_matched"))
    with pytest.raises(ConfigError, match=r"^backend.dtype=bfloat16_matched: this machine's bfloat16 GEMMs .* "
                                          r"use float32 here$"):
        backend.setup(ctx=make_context(tmp_path, model_dir))
    with pytest.raises(ConfigError, match="^rollout.dtype=bfloat16_matched: "):
        sample(tmp_path, model_dir, "bfloat16_matched")


@pytest.mark.parametrize("backend", [FSDPBackend, LoRABackend])
def test_only_the_torch_backend_takes_bfloat16_matched(backend: type) -> None:
    with pytest.raises(ConfigError, match="backend.dtype: expected one of 'float32', 'bfloat16'"):
        build_options(backend.Options, {"dtype": "bfloat16_matched"}, "backend")
    assert build_options(TorchBackend.Options, {"dtype": "bfloat16_matched"}, "backend").dtype == "bfloat16_matched"
