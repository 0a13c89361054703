"""The hf rollout on the real tiny model: batch layout, sampling controls, and exact logprobs."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from torch import Tensor
from transformers import AutoModelForCausalLM

from rlcore import Prompt, SamplingParams, Tool
from rlcore.config import build_options
from rlcore.context import RunContext
from rlcore.errors import ConfigError, RLCoreError
from rlcore.testing import check_rollout
from rlcore_backends.rollout.engine import render
from rlcore_backends.rollout.hf.rollout import HFRollout

EOS = 1


def test_contract(rlcore_context: RunContext) -> None:
    check_rollout(HFRollout(HFRollout.Options()), rlcore_context)


def test_layout_eos_and_truncation(rollout: HFRollout, prompts: list[Prompt]) -> None:
    batch = rollout.sample(prompts=prompts, params=SamplingParams(n=3, max_new_tokens=10, seed=3), tools=[], interaction=None)
    batch.validate()
    tok = rollout.tokenizer
    assert len(batch) == 12 and batch.group_ids.tolist() == [i for i in range(4) for _ in range(3)]
    assert [p.id for p in batch.prompts] == [str(i) for i in range(4) for _ in range(3)]
    P = max(len(p.messages[0]["content"]) for p in prompts)
    assert batch.prompt_ids.shape == (12, P)
    for i in range(len(batch)):
        text = batch.prompts[i].messages[0]["content"]
        plen = int(batch.prompt_mask[i].sum())
        assert batch.prompt_mask[i].tolist() == [0] * (P - plen) + [1] * plen, "prompts are left-padded"
        assert tok.decode(batch.prompt_ids[i, P - plen:]) == text
        assert (batch.prompt_ids[i, :P - plen] == tok.pad_token_id).all()
        n = int(batch.attention_mask[i].sum())
        R = batch.response_ids.shape[1]
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (R - n), "responses are right-padded"
        assert torch.equal(batch.response_mask[i], batch.attention_mask[i].float())
        ids = batch.response_ids[i, :n]
        assert (batch.rollout_logprobs[i, :n] < 0).all() and (batch.rollout_logprobs[i, n:] == 0).all()
        eos_seen = (ids == EOS).nonzero().flatten().tolist()
        if batch.info[i]["finish_reason"] == "eos":
            assert eos_seen == [n - 1], "the response ends with its first EOS, which is in the loss"
            assert not batch.truncated[i]
        else:
            assert batch.info[i]["finish_reason"] == "length" and batch.truncated[i]
            assert not eos_seen and n == 10
        assert batch.texts[i] == tok.decode(ids, skip_special_tokens=True)
    assert batch.truncated.any() and not batch.truncated.all(), "this seed gives both EOS-ended and truncated rows"
    assert batch.temperature == 1.0


def test_logprobs_match_independent_forward(rlcore_context: RunContext, rollout: HFRollout,
                                            prompts: list[Prompt]) -> None:
    """Each sample's logprobs equal a plain unpadded forward of prompt+response at logits / temperature."""
    batch = rollout.sample(prompts=prompts, params=SamplingParams(n=2, temperature=0.7, top_p=0.9,
                                                                   max_new_tokens=8, seed=1), tools=[], interaction=None)
    assert batch.temperature == 0.7
    model = AutoModelForCausalLM.from_pretrained(rlcore_context.model.path, dtype=torch.float32)
    for i in range(len(batch)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i] == 1]
        n = int(batch.attention_mask[i].sum())
        ids = torch.cat([prompt, batch.response_ids[i, :n]])[None]
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
        torch.testing.assert_close(batch.rollout_logprobs[i, :n], expected, atol=1e-5, rtol=0)


def test_greedy_is_deterministic(rollout: HFRollout, prompts: list[Prompt]) -> None:
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    a = rollout.sample(prompts=prompts, params=params, tools=[], interaction=None)
    b = rollout.sample(prompts=prompts, params=params, tools=[], interaction=None)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.rollout_logprobs, b.rollout_logprobs)
    assert torch.equal(a.response_ids[0::2], a.response_ids[1::2]), "greedy samples of one prompt agree"
    assert a.temperature == 1.0, "greedy reports logprobs at temperature 1"


def test_seed_and_global_rng(rollout: HFRollout, prompts: list[Prompt]) -> None:
    """params.seed reproduces without touching the global RNG; without it the global RNG decides."""
    seeded = SamplingParams(n=2, max_new_tokens=6, seed=7)
    torch.manual_seed(0)
    a = rollout.sample(prompts=prompts, params=seeded, tools=[], interaction=None)
    after_seeded = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after_seeded, torch.rand(1)), "a seeded sample leaves the global RNG alone"
    assert torch.equal(a.response_ids, rollout.sample(prompts=prompts, params=seeded, tools=[], interaction=None).response_ids)
    unseeded = SamplingParams(n=2, max_new_tokens=6)
    torch.manual_seed(5)
    b = rollout.sample(prompts=prompts, params=unseeded, tools=[], interaction=None)
    torch.manual_seed(5)
    assert torch.equal(b.response_ids, rollout.sample(prompts=prompts, params=unseeded, tools=[], interaction=None).response_ids)


def test_chunked_generate_matches_one_call(rlcore_context: RunContext, rollout: HFRollout,
                                           prompts: list[Prompt]) -> None:
    chunked = HFRollout(HFRollout.Options(max_rows_per_generate=3))
    chunked.setup(ctx=rlcore_context)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    a = rollout.sample(prompts=prompts, params=params, tools=[], interaction=None)
    b = chunked.sample(prompts=prompts, params=params, tools=[], interaction=None)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.group_ids, b.group_ids)
    assert torch.equal(a.prompt_ids, b.prompt_ids)
    torch.testing.assert_close(a.rollout_logprobs, b.rollout_logprobs, atol=1e-5, rtol=0)


def test_stop_strings(rollout: HFRollout, prompts: list[Prompt]) -> None:
    batch = rollout.sample(prompts=prompts, params=SamplingParams(n=4, max_new_tokens=10, stop=["5"], seed=0),
                           tools=[], interaction=None)
    reasons = [i["finish_reason"] for i in batch.info]
    assert "stop" in reasons, "this seed hits the stop string"
    for i, reason in enumerate(reasons):
        n = int(batch.attention_mask[i].sum())
        text = rollout.tokenizer.decode(batch.response_ids[i, :n])
        if reason == "stop":
            assert text.endswith("5") and "5" not in text[:-1] and not batch.truncated[i]
        else:
            assert "5" not in batch.texts[i]


def test_tools_go_through_the_tool_loop(rollout: HFRollout, prompts: list[Prompt]) -> None:
    """With tools the hf rollout runs `run_turns`' tool loop (the tiny model never calls one: a single turn)."""
    class Noop(Tool):
        name = "noop"

    batch = rollout.sample(prompts=prompts, params=SamplingParams(n=2, max_new_tokens=6, seed=0), tools=[Noop()], interaction=None)
    batch.validate()
    assert [i["turns"] for i in batch.info] == [1] * 8 and all(i["tool_calls"] == 0 for i in batch.info)
    assert torch.equal(batch.response_mask, batch.attention_mask.float())


def test_images_are_refused(rollout: HFRollout, prompts: list[Prompt]) -> None:
    prompts[0].images = ["diagram.png"]
    with pytest.raises(RLCoreError, match="images"):
        rollout.sample(prompts=prompts, params=SamplingParams(n=1), tools=[], interaction=None)


def test_render_with_and_without_chat_template(rollout: HFRollout) -> None:
    tok = rollout.tokenizer
    prompt = Prompt(messages=[{"role": "system", "content": "1+"}, {"role": "user", "content": "2="}])
    assert tok.decode(render(tok, prompt)) == "1+2="
    template, tok.chat_template = tok.chat_template, None
    try:
        assert render(tok, prompt) == tok("1+\n2=")["input_ids"]
    finally:
        tok.chat_template = template


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="rollout.dtype: expected one of 'auto', 'float32', 'bfloat16'"):
        build_options(HFRollout.Options, {"dtype": "float16"}, "rollout")
    assert build_options(HFRollout.Options, {"max_rows_per_generate": "8"}, "rollout").max_rows_per_generate == 8
    with pytest.raises(ConfigError, match="max_turns=0 must be at least 1"):
        build_options(HFRollout.Options, {"max_turns": 0}, "rollout")


@pytest.mark.parametrize("block", [16, 1024])  # several blocks and a ragged last one; one partial block
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.6)])
def test_sampler_draws_softmax_with_top_p_and_reports_untruncated_logprobs(
        monkeypatch: pytest.MonkeyPatch, block: int, temperature: float, top_p: float) -> None:
    """The rollout's sampler draws from softmax(logits / T) after transformers' top-p rule, its logprob is
    log_softmax(logits / T) at the token, and greedy generation then picks exactly that token."""
    from transformers import TopPLogitsWarper

    from rlcore_backends.rollout.hf.rollout import Sampler

    monkeypatch.setattr(Sampler, "BLOCK", block)
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 50, 40_000
    logits = torch.randn(1, vocab, generator=gen) * 1.5
    logits[0, 7] = float("-inf")
    torch.manual_seed(0)
    sampler = Sampler(temperature, top_p)
    scores = sampler(torch.zeros(rows, 1, dtype=torch.long), logits.expand(rows, vocab).clone())
    tokens = scores.argmax(-1)
    assert torch.equal(scores.isfinite().sum(-1), torch.ones(rows, dtype=torch.long))
    expected_lp = torch.log_softmax(logits / temperature, -1)[0]
    torch.testing.assert_close(sampler.logprobs[0], expected_lp[tokens], atol=1e-5, rtol=0)
    warped = TopPLogitsWarper(top_p)(None, logits / temperature) if top_p < 1 else logits / temperature
    p = torch.softmax(warped.double(), -1)[0]
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[p == 0].sum() == 0, "a token outside the support (or top-p nucleus) was drawn"
    seen = p * rows >= 5
    chi2 = float(((counts[seen] - rows * p[seen]) ** 2 / (rows * p[seen])).sum())
    assert chi2 < 2 * int(seen.sum()) + 30, chi2  # ~ dof ± a few sd; a wrong distribution gives thousands


def test_sampler_greedy_takes_the_argmax_with_temperature_one_logprobs() -> None:
    from rlcore_backends.rollout.hf.rollout import Sampler

    logits = torch.randn(4, 30)
    sampler = Sampler(0.0, 1.0)
    tokens = sampler(torch.zeros(4, 1, dtype=torch.long), logits.clone()).argmax(-1)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(sampler.logprobs[0], torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0])


def test_sampler_bans_eos_until_min_new_tokens_and_reports_unbanned_logprobs() -> None:
    from rlcore_backends.rollout.hf.rollout import Sampler

    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0]]).expand(2000, 4).clone()  # EOS (3) has ~98% of the mass
    expected = torch.log_softmax(logits[0], -1)
    for temperature in (1.0, 0.0):
        sampler = Sampler(temperature, 0.9 if temperature else 1.0, eos_ids=[3], min_new_tokens=2)
        first, second, third = (sampler.pick(logits.T.contiguous()) for _ in range(3))  # vocabulary-major
        assert not (first == 3).any() and not (second == 3).any(), "EOS is banned for the first two tokens"
        assert (third == 3).float().mean() > 0.9, "then EOS is drawn again"
        torch.testing.assert_close(sampler.logprobs[0], expected[first], atol=1e-6, rtol=0)


def test_min_new_tokens_holds_responses_to_their_length(rollout: HFRollout, prompts: list[Prompt]) -> None:
    def lengths(min_new_tokens: int) -> Tensor:
        params = SamplingParams(n=3, max_new_tokens=20, min_new_tokens=min_new_tokens, seed=3)
        return rollout.sample(prompts=prompts, params=params, tools=[], interaction=None).attention_mask.sum(1)

    assert (lengths(0) < 5).sum() >= 3, "this seed ends several responses within 4 tokens"
    held = lengths(5)
    assert (held >= 5).all() and (held < 20).any(), "with min_new_tokens=5 none ends before 5 tokens, some after"


def _force_way(monkeypatch, way: str) -> None:
    """Decode's `Linear` layers in `way` (the LM head too, or W @ h.T for `linear`, which it never uses)."""
    from rlcore_backends.rollout.hf import linears

    if way == "packed" and linears.pack(torch.ones(2, 2)) is None:
        pytest.skip("this torch has no oneDNN linear (the probe leaves `packed` out here)")
    monkeypatch.setattr(linears, "choose", lambda layers, steps, head=False, packable=True:
                        "skinny" if head and way == "linear" else way)


@pytest.mark.parametrize("way", ["linear", "skinny", "packed"])
def test_lean_decoder_matches_transformers_generate(rlcore_context: RunContext, rollout: HFRollout,
                                                   prompts: list[Prompt], monkeypatch, way: str) -> None:
    """The lean decode loop (distinct prompts prefilled once, finished rows dropped) samples exactly what
    transformers `generate` does with the same sampler, whichever way its `Linear` layers and LM head
    compute: greedy with EOS-ended rows of several lengths, and seeded sampling (every row's uniform is drawn
    each step, so the random stream is the same), and one sample per prompt in both orders (no repeated rows:
    the prefill cache is still put in the rows' order)."""
    _force_way(monkeypatch, way)
    reference = HFRollout(HFRollout.Options(decoder="generate"))
    reference.setup(ctx=rlcore_context)
    for order in (prompts, prompts[::-1]):
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
        lean = rollout.sample(prompts=order, params=params, tools=[], interaction=None)
        assert torch.equal(lean.response_ids, reference.sample(prompts=order, params=params, tools=[],
                                                               interaction=None).response_ids)
    for params in (SamplingParams(n=2, temperature=0.0, max_new_tokens=12),
                   SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=16, seed=3),
                   SamplingParams(n=2, max_new_tokens=9, min_new_tokens=6, seed=4)):
        lean = rollout.sample(prompts=prompts, params=params, tools=[], interaction=None)
        plain = reference.sample(prompts=prompts, params=params, tools=[], interaction=None)
        assert torch.equal(lean.response_ids, plain.response_ids)
        assert [i["finish_reason"] for i in lean.info] == [i["finish_reason"] for i in plain.info]
        torch.testing.assert_close(lean.rollout_logprobs, plain.rollout_logprobs, atol=1e-5, rtol=0)
        if params.seed == 3:
            assert len(set(lean.attention_mask.sum(1).tolist())) > 3, "rows end at EOS after different lengths"


def test_reserved_cache_layer_holds_what_a_dynamic_layer_holds() -> None:
    """The lean decoder's cache writes each step in place; after every append and row drop its keys and
    values equal those of transformers' concatenating layer, and it refuses to outgrow its room."""
    from transformers.cache_utils import DynamicLayer

    from rlcore_backends.rollout.hf.decode import ReservedLayer

    gen = torch.Generator().manual_seed(0)
    dynamic = DynamicLayer()
    dynamic.update(torch.randn(4, 2, 5, 3, generator=gen), torch.randn(4, 2, 5, 3, generator=gen))
    reserved = ReservedLayer.of(dynamic, room=3)
    for step in range(3):
        if step == 1:
            keep = torch.tensor([0, 2, 3])
            dynamic.batch_select_indices(keep)
            reserved.batch_select_indices(keep)
        rows = dynamic.keys.shape[0]
        k, v = torch.randn(rows, 2, 1, 3, generator=gen), torch.randn(rows, 2, 1, 3, generator=gen)
        want, got = dynamic.update(k, v), reserved.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert reserved.get_seq_length() == dynamic.get_seq_length() == 6 + step
    with pytest.raises(RuntimeError, match="more positions than reserved"):
        reserved.update(k, v)


@pytest.mark.parametrize("model_dtype, dtype", [(torch.float32, None), (torch.float32, torch.float64),
                                                (torch.bfloat16, None)])
def test_shared_prompt_cache_attends_as_sdpa_over_each_rows_whole_cache(model_dtype: torch.dtype,
                                                                        dtype: torch.dtype | None) -> None:
    """Attention over each distinct prompt's keys once plus the row's own generated keys equals SDPA over the
    row's prompt and generated keys concatenated (left padding masked), in float32, computed in float64 and
    returned in float32, or in bfloat16 (to its rounding), before and after rows leave (a prompt with none left
    is dropped); the cache refuses to outgrow its room."""
    from rlcore_backends.rollout.hf.shared_cache import SharedPromptCache

    gen = torch.Generator().manual_seed(0)
    prompts, kv, g, d, width = 3, 2, 3, 8, 6
    layers = [(torch.randn(prompts, kv, width, d, generator=gen).to(model_dtype),
               torch.randn(prompts, kv, width, d, generator=gen).to(model_dtype))]
    prompt_mask = torch.ones(prompts, width, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_mask[2, :5] = 0
    prompt_of = torch.tensor([2, 2, 0, 1, 0])
    cache = SharedPromptCache(layers, prompt_mask, prompt_of, room=3, dtype=dtype)
    keys, values = layers[0][0][prompt_of], layers[0][1][prompt_of]
    mask = prompt_mask[prompt_of].bool()
    for step in range(3):
        if step == 2:
            keep = torch.tensor([0, 2, 4])  # prompt 1's only row leaves
            keys, values, mask, prompt_of = keys[keep], values[keep], mask[keep], prompt_of[keep]
            cache.select(keep)
            assert len(cache.prompts[0][0]) == 2
        rows = len(prompt_of)
        query = torch.randn(rows, kv, g, d, generator=gen).to(model_dtype)
        key = torch.randn(rows, kv, d, generator=gen).to(model_dtype)
        value = torch.randn(rows, kv, d, generator=gen).to(model_dtype)
        keys, values = torch.cat([keys, key[:, :, None]], 2), torch.cat([values, value[:, :, None]], 2)
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.bool)], 1)
        got = cache.attend(0, query, key, value, scale=0.3)
        want = torch.nn.functional.scaled_dot_product_attention(
            query.to(dtype or torch.float32), keys.to(dtype or torch.float32), values.to(dtype or torch.float32),
            attn_mask=mask[:, None, None, :], scale=0.3)
        assert got.dtype == model_dtype
        tolerance = {torch.bfloat16: 1e-2, torch.float64: 1e-7}.get(dtype or model_dtype, 1e-6)
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=0)
    with pytest.raises(RuntimeError, match="more positions than reserved"):
        cache.attend(0, query, key, value, scale=0.3)


def test_shared_prompt_cache_math_attention_returns_what_the_cpu_kernel_returns() -> None:
    """The written-out attention other devices take gives the CPU flash kernel's output and log-sum-exp
    under a padding bias (checked here on the CPU)."""
    from rlcore_backends.rollout.hf.shared_cache import FLASH, math_attention

    gen = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(2, 3, 4, 8, generator=gen), torch.randn(2, 3, 7, 8, generator=gen),
                           torch.randn(2, 3, 7, 8, generator=gen))
    bias = torch.zeros(2, 1, 1, 7)
    bias[0, ..., :3] = float("-inf")
    for mask in (bias, None):
        want = FLASH(query, keys, values, 0.0, False, attn_mask=mask, scale=0.4)
        got = math_attention(query, keys, values, mask, 0.4)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)


FAMILIES = {"Llama": {}, "Qwen2": {}, "Qwen3": {},
            "Llama, biased, llama3 rope": {"attention_bias": True, "mlp_bias": True, "rope_parameters": {
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}}
"""Decoder families `DecodeStep` runs, with configurations that exercise its parts."""


def _family_model(family: str) -> torch.nn.Module:
    """A seeded random decoder of `family` (a `FAMILIES` key) with grouped-query attention and a head size
    that is not hidden / heads (Qwen2: biased q, k and v; Qwen3: q and k norms)."""
    kind = family.split(",")[0]
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, **FAMILIES[family])
    torch.manual_seed(0)
    return getattr(transformers, f"{kind}ForCausalLM")(config).eval()


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("way", ["linear", "packed", "bfloat16_matched"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_step_computes_what_the_transformers_decoder_does(monkeypatch, family: str, way: str,
                                                                padded: bool) -> None:
    """`DecodeStep` over a cache holding each distinct prompt once computes transformers' decoder forward over
    the prompt's cache copied to every row, for the same token, position and mask, step after step: rows
    sharing a prompt (not side by side), left-padded rows or none (transformers then passes no mask), a row
    dropped midway (its prompt's only one, so the prompt leaves the cache), with the q/k/v and gate/up groups
    packed together or computed one by one, and in `bfloat16_matched` (float64 attention), where the hidden
    states are the same bits."""
    from rlcore_backends.common.logprobs import distinct_rows
    from rlcore_backends.common.matched import match
    from rlcore_backends.rollout.hf import decode, linears, step
    from rlcore_backends.rollout.hf.shared_cache import SharedPromptCache

    model = _family_model(family)
    if way == "bfloat16_matched":
        try:
            match(model)
        except ValueError:
            pytest.skip("no row-invariant bf16 chunk on this machine (test_matched tests that path)")
    else:
        _force_way(monkeypatch, way)
    decoder = model.get_decoder()
    assert step.supported(decoder)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 5, 6, 7], [0, 13, 14, 15, 16]])
    if not padded:
        ids[ids == 0] = 3
    mask = (ids != 0).long()
    first, prompt_of = distinct_rows(ids, mask)
    assert len(first) == 3
    position = decode.position_ids(mask)[:, -1]
    with torch.no_grad():
        reference = transformers.DynamicCache(config=model.config)
        decoder(input_ids=ids, attention_mask=mask, position_ids=decode.position_ids(mask),
                past_key_values=reference, use_cache=True)
        transformers_step = decode.TransformersStep(decoder, reference, torch.arange(len(ids)), 4)
        prefill = transformers.DynamicCache(config=model.config)
        decoder(input_ids=ids[first], attention_mask=mask[first], position_ids=decode.position_ids(mask)[first],
                past_key_values=prefill, use_cache=True)
        with linears.decode_linears(model, model.lm_head, 64, step.groups(decoder)) as decode_linears:
            packed_groups = [g.args[1] is not None for g in decode_linears.groups]
            shared = SharedPromptCache([(layer.keys, layer.values) for layer in prefill.layers], mask[first],
                                       prompt_of, 4, step.attention_dtype(decoder))
            lean = step.DecodeStep(decoder, decode_linears.groups, shared)
            gen = torch.Generator().manual_seed(1)
            for index in range(4):
                if index == 2:
                    keep = torch.tensor([0, 2, 3])
                    transformers_step.select(keep)
                    lean.select(keep)
                    mask, position = mask[keep], position[keep]
                token = torch.randint(1, 40, (len(mask),), generator=gen)
                mask, position = torch.cat([mask, mask.new_ones(len(mask), 1)], 1), position + 1
                want, got = transformers_step(token, position, mask), lean(token, position, mask)
                if way == "bfloat16_matched":
                    assert torch.equal(got, want)
                else:
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(packed_groups) == (way == "packed") and any(packed_groups) == (way == "packed")
    assert len(shared.prompts[0][0]) == 2 and not shared.dense and shared.width == 2, "prompts of 2 rows and 1"
    for layer, theirs in enumerate(reference.layers):
        rows = shared.prompts[layer][0][shared.prompt_of]
        mine = torch.cat([rows, shared.keys[layer][:, :, :shared.lengths[layer]]], dim=2)
        torch.testing.assert_close(mine.to(theirs.keys.dtype), theirs.keys, atol=1e-5, rtol=1e-5)


def test_decoders_decode_step_does_not_know_take_transformers_forward(monkeypatch) -> None:
    """Sliding-window layers, another family, eager attention and hooks are left to transformers' forward,
    and `decode` samples the same greedy tokens through either step."""
    from rlcore_backends.rollout.hf import decode, step

    config = transformers.Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                      sliding_window=4, max_window_layers=0)
    assert not step.supported(transformers.Qwen2ForCausalLM(config).get_decoder())
    mistral = transformers.MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    assert not step.supported(transformers.MistralForCausalLM(mistral).get_decoder())
    eager = _family_model("Llama")
    eager.set_attn_implementation("eager")
    assert not step.supported(eager.get_decoder()), "eager rounds differently in bfloat16"
    hooked = _family_model("Qwen3")
    handle = hooked.get_decoder().layers[1].mlp.register_forward_hook(lambda module, args, out: out * 2)
    assert not step.supported(hooked.get_decoder()), "DecodeStep would skip the hook"
    handle.remove()
    assert step.supported(hooked.get_decoder())
    model = _family_model("Qwen2")
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = (ids != 0).long()
    runs = []
    for lean in (True, False):
        if not lean:
            monkeypatch.setattr(step, "supported", lambda decoder: False)
        sampler = decode.Sampler(0.0, 1.0)
        runs.append(decode.decode(model, model.lm_head, ids, mask, sampler, 6, [], None))
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]] and len(runs[0][0].token_ids) == 6
    torch.testing.assert_close([c.logprobs for c in runs[0]], [c.logprobs for c in runs[1]], atol=1e-5, rtol=0)


def _toy_model() -> torch.nn.Module:
    from rlcore_backends.common.matched import MatchedLinear

    model = torch.nn.Module()
    model.plain, model.biased, model.matched = (torch.nn.Linear(48, 80, bias=False), torch.nn.Linear(48, 80),
                                                MatchedLinear(48, 80, bias=False))
    model.get_decoder = lambda: model
    return model


@pytest.mark.parametrize("way", ["linear", "skinny", "packed"])
def test_decode_linears_compute_what_linear_computes_and_leave_other_layers_alone(monkeypatch, way: str) -> None:
    """Inside `decode_linears` each way (x @ W.T, W @ x.T with rows padded to a multiple of 8, oneDNN over
    packed weights) computes a float32 `Linear`'s calls of few rows as `Linear` does: the same values (to
    float32 rounding), shape and contiguity, bias included; calls of more rows and `MatchedLinear` layers
    are computed as before, the LM head's logits come vocabulary-major in the given buffer, and leaving
    restores every layer's own forward."""
    from rlcore_backends.rollout.hf import linears

    _force_way(monkeypatch, way)
    gen = torch.Generator().manual_seed(0)
    model, head = _toy_model(), torch.nn.Linear(48, 300)
    inputs = [torch.randn(2, 3, 48, generator=gen), torch.randn(1, 13, 48, generator=gen),
              torch.randn(linears.DECODE_ROWS + 1, 48, generator=gen)]
    hidden = torch.randn(5, 48, generator=gen)
    buffer = torch.full((300 * 8,), float("nan"))
    with torch.no_grad():
        want = {name: [layer(x) for x in inputs] for name, layer in model.named_children()}
        with linears.decode_linears(model, head, steps=64) as decode_linears:
            head_logits = decode_linears.head_logits
            assert ("forward" in vars(model.plain)) == (way != "linear") and "forward" not in vars(model.matched)
            got = {name: [layer(x) for x in inputs] for name, layer in model.named_children()}
            logits = head_logits(hidden, buffer)
            many_rows = torch.randn(linears.DECODE_ROWS + 1, 48, generator=gen)
            wide = head_logits(many_rows, torch.empty(300 * (linears.DECODE_ROWS + 1)))
    for name, (six, thirteen, many) in got.items():
        assert six.shape == (2, 3, 80) and thirteen.shape == (1, 13, 80) and six.is_contiguous()
        torch.testing.assert_close(six, want[name][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(thirteen, want[name][1], atol=1e-5, rtol=1e-5)
        assert torch.equal(many, want[name][2]), "more rows than DECODE_ROWS: Linear's own GEMM"
    assert torch.equal(got["matched"][0], want["matched"][0])
    assert logits.shape == (300, 5) and logits.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(logits, head(hidden).T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide, head(many_rows).T, atol=1e-5, rtol=1e-5)
    assert not any("forward" in vars(layer) for layer in model.children())


@pytest.mark.parametrize("way", ["linear", "skinny", "packed"])
def test_decode_linears_groups_compute_each_layers_output(monkeypatch, way: str) -> None:
    """A group of layers that take the same input yields each layer's output: packed, as one GEMM over their
    weights packed together (biases too, zeros for a layer without), its members left unpatched for calls of
    more rows; a group holding a `MatchedLinear` computes one by one; a failed packing computes x @ W.T."""
    from rlcore_backends.rollout.hf import linears

    _force_way(monkeypatch, way)
    model, head = _toy_model(), torch.nn.Linear(48, 300)
    groups = [[model.plain, model.biased], [model.biased, model.matched]]
    few, many = torch.randn(5, 48), torch.randn(linears.DECODE_ROWS + 1, 48)
    with torch.no_grad():
        want = [[layer(x) for layer in group] for group in groups for x in (few, many)]
        with linears.decode_linears(model, head, steps=64, groups=groups) as decode_linears:
            fused = [call.args[1] is not None for call in decode_linears.groups]
            patched = "forward" in vars(model.plain)
            got = [list(call(x)) for call in decode_linears.groups for x in (few, many)]
        monkeypatch.setattr(linears, "pack", lambda weight: None)
        with linears.decode_linears(model, head, steps=64, groups=groups) as decode_linears:
            failed = [list(call(few)) for call in decode_linears.groups]
    assert fused == [way == "packed", False] and patched == (way == "skinny")
    for mine, theirs in zip(got + failed, want + want[::2]):
        assert [t.shape for t in mine] == [t.shape for t in theirs]
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decode_linears_way_is_measured_once_and_packing_must_pay_for_itself(monkeypatch) -> None:
    """`timing` measures every way at the model's shapes once per process (the head's separately, and two
    models of one shape but another depth apart); `fastest` counts the packing once per decode and keeps the
    baseline unless another way saves 1.1x; packed weights are neither timed nor chosen where their copy
    would take more than half the memory still available."""
    from rlcore_backends.rollout.hf import linears

    model = _toy_model()
    measured = linears.timing([model.plain, model.biased])
    assert {"linear", "skinny"} <= set(measured.step) and all(s > 0 for s in measured.step.values())
    assert linears.timing([model.plain, model.biased]) is measured
    assert linears.timing([model.plain]) is not measured, "another layer count is another measurement"
    assert set(linears.timing([torch.nn.Linear(48, 300)], head=True).step) <= {"skinny", "packed"}
    given = linears.Timing({"linear": 1.0, "skinny": 0.95, "packed": 0.5}, pack=20.0)
    assert given.fastest(steps=128, baseline="linear") == "packed"  # 128 + 0 against 64 + 20
    assert given.fastest(steps=8, baseline="linear") == "linear", "20 s of packing for 4 s saved"
    assert linears.Timing({"linear": 1.0, "skinny": 0.95}, pack=0.0).fastest(128, "linear") == "linear"
    assert linears.Timing({"linear": 1.0, "skinny": 0.8}, pack=0.0).fastest(128, "linear") == "skinny"
    head = torch.nn.Linear(48, 80)
    assert linears.timing([head], head=True) is not linears.timing([head]), "the head's ways are its own"
    assert "linear" not in linears.timing([head], head=True).step
    if linears.pack(torch.ones(2, 2)) is not None:
        monkeypatch.setattr(linears, "available_bytes", lambda: 10**15)
        assert "packed" in linears.timing([torch.nn.Linear(40, 24)]).step
    monkeypatch.setattr(linears, "available_bytes", lambda: 1000)
    assert "packed" not in linears.timing([torch.nn.Linear(40, 24)]).step, "no room: not even timed"
    monkeypatch.setattr(linears, "timing", lambda layers, head=False: given)
    copies = 3 * 80 * 48 * 4  # the plain and biased layers' weights and the head's, float32
    monkeypatch.setattr(linears, "available_bytes", lambda: 2 * copies)
    assert linears.ways(model, head, steps=128)[1:] == ("packed", "packed")
    monkeypatch.setattr(linears, "available_bytes", lambda: 2 * copies - 1)
    assert linears.ways(model, head, steps=128)[1:] == ("linear", "skinny"), "the copies together need more"


def test_decode_linears_restore_layers_when_packing_fails_or_raises(monkeypatch) -> None:
    """A failed packing (None: out of memory) computes x @ W.T and W @ x.T instead; an exception while
    entering leaves no layer patched; a forward already set on a layer's instance (a hook's) is left alone."""
    from rlcore_backends.rollout.hf import linears

    model, head = _toy_model(), torch.nn.Linear(48, 300)
    hook = model.biased.forward = functools.partial(torch.nn.Linear.forward, model.biased)
    monkeypatch.setattr(linears, "choose", lambda layers, steps, head=False, packable=True: "packed")
    monkeypatch.setattr(linears, "pack", lambda weight: None)
    x, hidden = torch.randn(4, 48), torch.randn(3, 48)
    with torch.no_grad(), linears.decode_linears(model, head, steps=64) as decode_linears:
        assert "forward" not in vars(model.plain) and vars(model.biased)["forward"] is hook
        torch.testing.assert_close(model.plain(x), torch.nn.functional.linear(x, model.plain.weight))
        torch.testing.assert_close(decode_linears.head_logits(hidden, torch.empty(300 * 3)), head(hidden).T)
    calls = []

    def failing(weight: torch.Tensor) -> torch.Tensor:
        calls.append(weight)
        if len(calls) == 2:  # the second of two plain layers
            raise KeyboardInterrupt
        return weight

    monkeypatch.setattr(linears, "pack", failing)
    del model.biased.forward
    with pytest.raises(KeyboardInterrupt), linears.decode_linears(model, head, steps=64):
        pass
    assert len(calls) == 2 and not any("forward" in vars(layer) for layer in model.children())


def test_column_max_is_amax_over_the_vocabulary() -> None:
    """The sampler's column maximum equals `amax(0)` exactly, for vocabularies below, at and past a multiple
    of its 64 slabs, with -inf entries (banned tokens) and a column that is all -inf but one."""
    from rlcore_backends.rollout.hf.decode import column_max

    gen = torch.Generator().manual_seed(0)
    for vocab, rows in [(10, 3), (64, 1), (130, 5), (4096, 16), (4099, 13)]:
        values = torch.randn(vocab, rows, generator=gen)
        values[::7] = float("-inf")
        values[:, 0] = float("-inf")
        values[vocab - 1, 0] = 2.5
        assert torch.equal(column_max(values), values.amax(0))
        assert column_max(values)[0] == 2.5
