"""The chunked LM-head path of `logprobs.response_logprobs` equals the full-logits path, values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlcore_backends.common.logprobs import (head_logprobs, plain_head, response_logits, response_logprobs,
                                             shared_prompt_hidden, token_entropy, token_logprobs)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_logprobs_match_full_logits_values_and_gradients(bias: bool, temperature: float) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 5))
    g_lp, g_ent = torch.randn(3, 5), torch.randn(3, 5)

    def grads(fn):
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        lp, ent = fn()
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp.detach(), ent.detach(), hidden.grad, head.weight.grad, None if head.bias is None else head.bias.grad

    def full():
        logits = head(hidden).float() / temperature
        return token_logprobs(logits, tokens), token_entropy(logits)

    expected = grads(full)
    # one row per tile, ragged last tiles both ways, one tile of everything; tiles recomputed or kept
    for tile_rows, tile_columns, keep_mib in ((1, 50, 0), (4, 7, 0), (15, 64, 0), (4, 7, 1), (15, 64, 1)):
        got = grads(lambda: head_logprobs(hidden, head, tokens, temperature, tile_rows, tile_columns, keep_mib))
        for e, g in zip(expected, got):
            if e is not None:
                torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_response_logprobs_fast_path_matches_the_logits_path(entropy_grad: bool) -> None:
    model = tiny_qwen2()
    assert plain_head(model) is model.lm_head
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt
    response = ids[:, -4:]

    def run(fast: bool):
        model.zero_grad(set_to_none=True)
        if fast:
            lp, ent = response_logprobs(model, ids, mask, response, 0.8, entropy_grad=entropy_grad)
        else:
            logits = response_logits(model, ids, mask, 4, 0.8)
            lp, ent = token_logprobs(logits, response), token_entropy(logits)
            ent = ent if entropy_grad else ent.detach()
        assert ent.requires_grad == entropy_grad
        (lp.sum() + (ent.sum() if entropy_grad else 0)).backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast, slow = run(True), run(False)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-5, rtol=1e-5)
    for name, grad in slow[2].items():
        torch.testing.assert_close(fast[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def grouped_rows(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts (one left-padded) three times each, rows interleaved, responses of `width` right-padded."""
    torch.manual_seed(1)
    prompts = torch.randint(0, 97, (2, 6))
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[1, :2] = 0
    rows = torch.tensor([0, 1, 0, 0, 1, 1])
    response = torch.randint(0, 97, (6, width))
    response_mask = torch.ones_like(response)
    response_mask[2, width // 2:] = 0
    response_mask[5, -1:] = 0
    return torch.cat([prompts[rows], response], 1), torch.cat([prompt_mask[rows], response_mask], 1)


@pytest.mark.parametrize("width", [5, 1])
def test_shared_prompts_equal_whole_rows_values_and_gradients(width: int) -> None:
    model = tiny_qwen2()
    ids, mask = grouped_rows(width)
    calls = []
    model.model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)

    def run(share: bool):
        model.zero_grad(set_to_none=True)
        calls.clear()
        lp, ent = response_logprobs(model, ids, mask, ids[:, -width:], 0.9, entropy_grad=True, share_prompts=share)
        ((lp * mask[:, -width:]).sum() + (ent * mask[:, -width:]).sum()).backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, list(calls)

    shared, whole = run(True), run(False)
    real = mask[:, -width:].bool()
    torch.testing.assert_close(shared[0][real], whole[0][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1][real], whole[1][real], atol=1e-5, rtol=1e-5)
    for name, grad in whole[2].items():
        torch.testing.assert_close(shared[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # the two distinct prompts ran once each, then the responses on their cache (no response pass for width 1)
    assert shared[3] == [torch.Size([2, 6])] + ([torch.Size([6, width - 1])] if width > 1 else [])
    assert whole[3] == [torch.Size([6, 6 + width])]


def test_prompts_run_whole_when_none_repeats_or_the_cache_cannot_keep_gradients() -> None:
    model = tiny_qwen2()
    ids, mask = grouped_rows(4)
    assert shared_prompt_hidden(model.model, ids[:2], mask[:2], 4) is None  # two different prompts
    assert shared_prompt_hidden(model.model, ids, mask, 4) is not None
    model.gradient_checkpointing_enable()
    assert shared_prompt_hidden(model.model, ids, mask, 4) is None


def test_autocast_and_unknown_models_take_the_logits_path() -> None:
    model = tiny_qwen2()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain_head(model) is None
    assert plain_head(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("keep_mib,backward_tiles", [(0, 4), (1, 0)])
def test_head_logprobs_keeps_the_forward_tiles_for_backward_when_they_fit(
        monkeypatch: pytest.MonkeyPatch, keep_mib: float, backward_tiles: int) -> None:
    """With room for the logits, backward computes no tile again (no LM-head matmul); without, all of them."""
    from rlcore_backends.common import logprobs

    calls: list[int] = []
    original = logprobs._tile_logits
    monkeypatch.setattr(logprobs, "_tile_logits", lambda *a: calls.append(1) or original(*a))
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(12, 16, requires_grad=True)
    lp, _ = head_logprobs(hidden, head, torch.randint(0, 50, (12,)), 1.0, 6, 25, keep_mib)
    assert len(calls) == 4  # 2 x 2 tiles of [6 x 25] logits
    lp.sum().backward()
    assert len(calls) == 4 + backward_tiles
