"""The Megatron backend on CPU over gloo: tensor parallel (tp=2, Qwen2 with grouped-query attention and qkv
bias) and pipeline parallel (pp=2, Llama with tied embeddings, activation recomputation), checked against
Hugging Face transformers and the torch backend on the same weights and batches.

Megatron-core targets CUDA; `megatron_on_cpu` (test-only, run first in every worker process) stands in
for the CUDA calls it makes on the way. Nothing of it is in the product code.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("megatron.core", reason="needs megatron-core (pip install 'rlcore-backends[megatron]')")

from rlcore import LossInputs, LossNorm, PolicyLoss, RolloutBatch, UpdatePlan  # noqa: E402
from rlcore.context import RunContext  # noqa: E402
from rlcore.errors import ConfigError, TrainingError  # noqa: E402
from rlcore.testing import check_backend, make_batch, make_context  # noqa: E402
from rlcore_backends.common.logprobs import response_logits, token_entropy, token_logprobs  # noqa: E402
from rlcore_backends.update.megatron.backend import MegatronBackend  # noqa: E402
from rlcore_backends.update.megatron.convert import hf_from_shards  # noqa: E402
from rlcore_backends.update.megatron.inputs import pack  # noqa: E402
from rlcore_backends.update.megatron.loss import vocab_parallel_logprobs  # noqa: E402
from rlcore_backends.update.torch.backend import TorchBackend  # noqa: E402
from test_megatron_convert import COMMON, save_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402

pytestmark = pytest.mark.slow  # each backend starts two worker processes that import Megatron (~30-45 s)


def megatron_on_cpu() -> None:
    """Test-only: let Megatron-core's CUDA-only code paths run on the CPU, in this worker process.

    - `torch.cuda.current_device()` (rotary embedding, attention, layers, DDP buffers) -> the CPU;
    - tensors created with `device="cuda"` (the pipeline schedules' token counter) -> on the CPU;
    - `torch.cuda.synchronize()` (pipeline p2p) -> nothing; `Tensor.cuda()` (tied embeddings across
      pipeline stages) -> the tensor itself;
    - the CUDA RNG tracker: `fork()` -> nothing, and recomputation's CUDA RNG state save/restore -> nothing
      (dropout is 0 in these models, so no random numbers are drawn).
    Two threads per worker would oversubscribe the 2-core machine: one each.
    """
    from megatron.core.tensor_parallel import random as megatron_random

    torch.set_num_threads(1)
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    def on_cpu(make: Any) -> Any:
        @functools.wraps(make)
        def wrapped(*args: Any, device: Any = None, **kwargs: Any) -> Tensor:
            if device is not None and torch.device(device).type == "cuda":
                device = "cpu"
            return make(*args, device=device, **kwargs)
        return wrapped

    torch.zeros = on_cpu(torch.zeros)
    megatron_random.CudaRNGStatesTracker.fork = lambda self, *args, **kwargs: contextlib.nullcontext()
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: None
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None


TRAINING = {"lr": 1e-3, "max_grad_norm": 0.1, "lr_scheduler_type": "cosine", "min_lr_ratio": 0.5,
            "total_training_steps": 4}
"""Options shared by a Megatron backend and its torch twin: big steps, clipped gradients, a cosine LR."""


class PGWithEntropy(PolicyLoss):
    """Token-mean policy gradient with an entropy bonus: depends on every token's logprob and entropy."""

    needs_entropy = True

    def __call__(self, inputs: LossInputs, norm: LossNorm) -> tuple[Tensor, dict[str, Tensor]]:
        old = inputs.old_logprobs if inputs.old_logprobs is not None else inputs.logprobs.detach()
        ratio = torch.exp(inputs.logprobs - old)
        pg = -(ratio * inputs.advantages * inputs.mask).sum() / norm.tokens
        bonus = (inputs.entropy * inputs.mask).sum() / norm.tokens
        return pg - 0.01 * bonus, {"pg/ratio": (ratio.detach() * inputs.mask).sum() / norm.tokens}


class NaNLoss(PGWithEntropy):
    def __call__(self, inputs: LossInputs, norm: LossNorm) -> tuple[Tensor, dict[str, Tensor]]:
        value, metrics = super().__call__(inputs, norm)
        return value * float("nan"), metrics


def start(ctx: RunContext, **options: Any) -> MegatronBackend:
    backend = MegatronBackend(MegatronBackend.Options(**options))
    backend.worker_init = megatron_on_cpu
    backend.setup(ctx=ctx)
    return backend


def twin(ctx: RunContext, **options: Any) -> TorchBackend:
    """The torch backend on the same model: the reference every Megatron result is compared with."""
    backend = TorchBackend(TorchBackend.Options(**options))
    backend.setup(ctx=ctx)
    return backend


def training_batch(seed: int = 0) -> RolloutBatch:
    """Responses of varied length and left-padded prompts, with advantages and old logprobs; two responses
    start with the padding token (id 0), which transformers' embedding never trains."""
    batch = make_batch(groups=3, n=3, prompt_len=6, response_len=7, vocab=17, seed=seed, with_advantages=True)
    batch.response_ids[:2, 0] = 0
    batch.old_logprobs = batch.rollout_logprobs
    return batch


def clipped_grads(backend: TorchBackend) -> list[dict[str, Tensor]]:
    seen: list[dict[str, Tensor]] = []
    backend.optimizer.register_step_pre_hook(lambda *_: seen.append(
        {n: p.grad.clone() for n, p in backend.model.named_parameters()}))
    return seen


# ---- commands run inside the workers (module-level, so they pickle) ---------------------------------

def main_grads(worker: Any) -> tuple[tuple[int, int], dict[str, Tensor]]:
    """This rank's gradients of the last step (clipped) under canonical names."""
    return (worker.tp_rank, worker.pp_rank), {n: p.main_grad.clone() for n, p in worker.model.named_parameters()}


def full_logits(worker: Any, batch: RolloutBatch) -> Tensor | None:
    """Logits [B, R, V] at the response positions, tp shards all-gathered (pp=1 only)."""
    inputs = pack(batch)
    with torch.no_grad():
        shard = worker.model(inputs.tokens, inputs.position_ids, inputs.attention_mask)
        parts = [torch.empty_like(shard) for _ in range(worker.opts.tp)]
        torch.distributed.all_gather(parts, shard.contiguous(), group=worker.tp_group)
    if not worker.reports:
        return None
    logits = torch.cat(parts, -1)[..., :worker.layout.vocab]
    return logits.gather(1, inputs.logit_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def sharded_logprobs(worker: Any, logits: Tensor, tokens: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`vocab_parallel_logprobs` on this rank's slice of full logits, and the gradient of a weighted sum."""
    start, width = worker.vocab_start, worker.vocab_real
    shard = logits[..., start:start + width].clone().requires_grad_(True)
    lp, entropy = vocab_parallel_logprobs(shard, tokens, start, worker.tp_group)
    (lp * weights[0] + entropy * weights[1]).sum().backward()
    return lp.detach(), entropy.detach(), shard.grad


def kill_rank_1(worker: Any) -> None:
    if torch.distributed.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)


# ---- tensor parallel: tp=2 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    directory = save_model(Qwen2Config(**{**COMMON, "num_hidden_layers": 2}, tie_word_embeddings=False),
                           tmp_path_factory.mktemp("qwen2"))
    return make_context(tmp_path_factory.mktemp("run"), directory)


@pytest.fixture(scope="module")
def tp2_started(qwen_ctx: RunContext,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MegatronBackend, Path]]:
    backend = start(qwen_ctx, tp=2, micro_batch_tokens=40, **TRAINING)
    initial = tmp_path_factory.mktemp("initial")
    backend.save_state(directory=initial)
    yield backend, initial
    backend.teardown()


@pytest.fixture
def tp2(tp2_started: tuple[MegatronBackend, Path]) -> MegatronBackend:
    """The tp=2 backend restored to its starting weights and optimizer state."""
    backend, initial = tp2_started
    backend.load_state(directory=initial)
    return backend


def test_logits_equal_hugging_face(tp2: MegatronBackend, qwen_ctx: RunContext) -> None:
    batch = training_batch()
    hf = AutoModelForCausalLM.from_pretrained(qwen_ctx.model.path)
    ids, mask = batch.sequences()
    with torch.no_grad():
        expected = response_logits(hf, ids, mask, batch.response_ids.shape[1], 1.0)
    got = next(x for x in tp2.pool.run(full_logits, batch) if x is not None)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_logprobs_equal_the_torch_backend(tp2: MegatronBackend, qwen_ctx: RunContext) -> None:
    batch = training_batch()
    expected = twin(qwen_ctx).logprobs(batch=batch, reference=False)
    torch.testing.assert_close(tp2.logprobs(batch=batch, reference=False), expected, atol=1e-5, rtol=0)


def test_vocab_parallel_logprobs_and_entropy_equal_the_full_vocabulary(tp2: MegatronBackend) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g) * 4
    tokens = torch.randint(0, 17, (3, 5), generator=g)
    weights = torch.randn(2, 3, 5, generator=g)
    answers = tp2.pool.run(sharded_logprobs, logits, tokens, weights)
    full = logits.double().requires_grad_(True)  # the full-vocabulary reference, in float64
    lp, entropy = token_logprobs(full, tokens), token_entropy(full)
    (lp * weights[0] + entropy * weights[1]).sum().backward()
    for got_lp, got_entropy, _ in answers:
        torch.testing.assert_close(got_lp.double(), lp.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(got_entropy.double(), entropy.detach(), atol=1e-6, rtol=0)
    grads = torch.cat([grad for _, _, grad in answers], -1)
    torch.testing.assert_close(grads.double(), full.grad, atol=1e-6, rtol=0)


def test_policy_weights_are_the_hugging_face_weights(tp2: MegatronBackend, qwen_ctx: RunContext) -> None:
    expected = AutoModelForCausalLM.from_pretrained(qwen_ctx.model.path).state_dict()
    got = dict(tp2.policy_weights().named_tensors())
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_a_training_step_equals_the_torch_backend(tp2: MegatronBackend, qwen_ctx: RunContext) -> None:
    """Same loss, entropy, gradient norm and (clipped) gradients; the same logprobs after the step."""
    batch = training_batch()
    torch_backend = twin(qwen_ctx, **TRAINING)
    expected_grads = clipped_grads(torch_backend)
    expected = torch_backend.update(batch=batch, loss=PGWithEntropy(), plan=UpdatePlan())
    got = tp2.update(batch=batch, loss=PGWithEntropy(), plan=UpdatePlan())
    for key in ("loss", "entropy", "grad_norm", "pg/ratio", "lr"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert expected["grad_norm"] > TRAINING["max_grad_norm"], "clipping is exercised"
    grads = hf_from_shards(tp2.layout, dict(tp2.pool.run(main_grads)))
    for name, grad in expected_grads[0].items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tp2.logprobs(batch=batch, reference=False),
                               torch_backend.logprobs(batch=batch, reference=False), atol=1e-5, rtol=0)


def test_epochs_and_mini_batches_equal_the_torch_backend(tp2: MegatronBackend, qwen_ctx: RunContext) -> None:
    batch, plan = training_batch(seed=1), UpdatePlan(epochs=2, mini_batches=2)
    torch_backend = twin(qwen_ctx, **TRAINING)
    expected = torch_backend.update(batch=batch, loss=PGWithEntropy(), plan=plan)
    got = tp2.update(batch=batch, loss=PGWithEntropy(), plan=plan)
    for key in ("loss", "entropy", "grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4), key
    assert tp2.policy_weights().version == torch_backend.steps == 4
    torch.testing.assert_close(tp2.logprobs(batch=batch, reference=False),
                               torch_backend.logprobs(batch=batch, reference=False), atol=1e-4, rtol=0)


def test_reference_logprobs_stay_at_the_starting_policy(tp2: MegatronBackend) -> None:
    batch = training_batch()
    before = tp2.logprobs(batch=batch, reference=False)
    tp2.update(batch=batch, loss=PGWithEntropy(), plan=UpdatePlan())
    assert not torch.allclose(tp2.logprobs(batch=batch, reference=False), before, atol=1e-4)
    torch.testing.assert_close(tp2.logprobs(batch=batch, reference=True), before, atol=1e-6, rtol=0)


def test_save_load_resumes_exactly_and_exports(tp2: MegatronBackend, tmp_path: Path) -> None:
    batch = training_batch()
    tp2.update(batch=batch, loss=PGWithEntropy(), plan=UpdatePlan())
    tp2.save_state(directory=tmp_path)
    saved = dict(tp2.policy_weights().named_tensors())
    first = tp2.update(batch=batch, loss=PGWithEntropy(), plan=UpdatePlan())
    after_first = tp2.logprobs(batch=batch, reference=False)
    tp2.load_state(directory=tmp_path)
    again = tp2.update(batch=batch, loss=PGWithEntropy(), plan=UpdatePlan())
    assert {k: v for k, v in again.items() if not k.startswith("update/")} == \
        {k: v for k, v in first.items() if not k.startswith("update/")}
    assert torch.equal(tp2.logprobs(batch=batch, reference=False), after_first)
    exported = AutoModelForCausalLM.from_pretrained(tp2.export_model(checkpoint=tmp_path, out=tmp_path / "hf"))
    assert all(torch.equal(exported.state_dict()[name], tensor) for name, tensor in saved.items())
    with pytest.raises(ConfigError, match="saved with tp=2, pp=1; resume with --set backend.tp=2"):
        MegatronBackend(MegatronBackend.Options(tp=1, pp=2)).load_state(directory=tmp_path)


def test_a_non_finite_loss_stops_with_the_trainers_message(tp2_started: tuple[MegatronBackend, Path]) -> None:
    """Last test on this backend: a worker's TrainingError reaches the driver as is, and stops the workers."""
    backend, _ = tp2_started
    with pytest.raises(TrainingError, match=r"^non-finite loss nan .* at optimizer step \d+; the step was not applied"):
        backend.update(batch=training_batch(), loss=NaNLoss(), plan=UpdatePlan())
    assert not any(p.is_alive() for p in backend.pool.processes)


# ---- pipeline parallel: pp=2 -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    directory = save_model(LlamaConfig(**{**COMMON, "num_hidden_layers": 2}, tie_word_embeddings=True),
                           tmp_path_factory.mktemp("llama"))
    return make_context(tmp_path_factory.mktemp("run"), directory)


def test_pipeline_parallel_with_tied_embeddings_and_recompute(llama_ctx: RunContext, tmp_path: Path) -> None:
    """pp=2 (1F1B over several micro-batches, the tied embedding on both stages) passes the backend contract,
    then matches the torch backend on logprobs and on a training step; a killed worker is named."""
    backend = MegatronBackend(MegatronBackend.Options(pp=2, micro_batch_tokens=40, recompute=True, **TRAINING))
    backend.worker_init = megatron_on_cpu
    try:
        batch = training_batch()
        check_backend(backend, llama_ctx, batch, PGWithEntropy(), tmp_path)
        torch_backend = twin(llama_ctx, **TRAINING)
        torch.testing.assert_close(backend.logprobs(batch=batch, reference=False),
                                   torch_backend.logprobs(batch=batch, reference=False), atol=1e-5, rtol=0)
        expected = torch_backend.update(batch=batch, loss=PGWithEntropy(), plan=UpdatePlan())
        got = backend.update(batch=batch, loss=PGWithEntropy(), plan=UpdatePlan())
        for key in ("loss", "entropy", "grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
        weights = dict(backend.policy_weights().named_tensors())
        assert "lm_head.weight" not in weights, "tied: the embedding is the output layer"
        for name, tensor in torch_backend.model.state_dict().items():
            if name != "lm_head.weight":
                torch.testing.assert_close(weights[name], tensor, atol=1e-4, rtol=0)
        torch.testing.assert_close(backend.logprobs(batch=batch, reference=False),
                                   torch_backend.logprobs(batch=batch, reference=False), atol=1e-5, rtol=0)
        with pytest.raises(TrainingError, match=r"Megatron worker rank 1 died \(exit code -9\) during kill_rank_1"):
            backend.pool.run(kill_rank_1)
    finally:
        backend.teardown()


def test_options_are_checked_before_any_worker_starts(qwen_ctx: RunContext) -> None:
    with pytest.raises(ConfigError, match="sequence_parallel needs backend.tp > 1 and backend.transformer_engine"):
        MegatronBackend(MegatronBackend.Options(tp=2, sequence_parallel=True)).setup(ctx=qwen_ctx)
    with pytest.raises(ConfigError, match="backend.tp=3 must divide"):
        MegatronBackend(MegatronBackend.Options(tp=3)).setup(ctx=qwen_ctx)
    with pytest.raises(ConfigError, match=r"backend megatron needs GPUs \(--hardware cuda\)"):
        MegatronBackend(MegatronBackend.Options(tp=2)).setup(ctx=qwen_ctx)
