"""SGLang request building and response parsing against its documented schemas, and weight bucketing."""

from __future__ import annotations

import pytest
import torch
from sglang_fake import validate

from rlcore import SamplingParams
from rlcore.errors import DataError, RLCoreError
from rlcore_backends.rollout.sglang.api import (SGLangError, check_result, distributed_update_request, generate_request,
                                        init_group_request, memory_request, parse_completion, parse_generate,
                                        sampling_params, tensor_update_request)
from rlcore_backends.rollout.sglang.sync import buckets, cast


def output(entries: list, reason: dict, **meta: object) -> dict:
    return {"text": "x", "meta_info": {"id": "a", "finish_reason": reason, "output_token_logprobs": entries, **meta}}


def test_sampling_params_say_exactly_what_rlcore_asks() -> None:
    sp = sampling_params(SamplingParams(n=4, temperature=0.7, top_p=0.9, max_new_tokens=12, min_new_tokens=5,
                                        stop=["\n\n", "END"]))
    assert sp == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                  "frequency_penalty": 0.0, "presence_penalty": 0.0, "max_new_tokens": 12, "min_new_tokens": 5,
                  "stop": ["\n\n", "END"]}
    assert "n" not in sp, "n samples are repeated rows, never SGLang's parallel sampling"
    assert "stop" not in sampling_params(SamplingParams(stop=[]))


def test_generate_request_matches_the_documented_schema() -> None:
    req = generate_request([[5, 6, 7], [8]], SamplingParams(temperature=0.0, max_new_tokens=3))
    assert validate("/generate", req) == []
    assert req["input_ids"] == [[5, 6, 7], [8]] and req["return_logprob"] is True
    assert isinstance(req["sampling_params"], dict) and req["sampling_params"]["temperature"] == 0.0


def test_seeded_rows_get_distinct_seeds() -> None:
    req = generate_request([[1, 2]] * 3, SamplingParams(seed=10))
    assert validate("/generate", req) == []
    assert [sp["sampling_seed"] for sp in req["sampling_params"]] == [10, 11, 12]


def test_generate_request_rejects_empty_prompts() -> None:
    with pytest.raises(DataError, match="at least one token"):
        generate_request([[1], []], SamplingParams())
    with pytest.raises(DataError, match="at least one prompt"):
        generate_request([], SamplingParams())


@pytest.mark.parametrize(("reason", "expected"), [
    ({"type": "stop", "matched": 151645}, "eos"),
    ({"type": "stop", "matched": [2, 3]}, "eos"),
    ({"type": "stop", "matched": "\n\n"}, "stop"),
    ({"type": "length", "length": 3}, "length"),
])
def test_finish_reasons(reason: dict, expected: str) -> None:
    done = parse_completion(output([[-0.5, 11, None], [-1.25, 12, None], [-0.0, 13, None]], reason))
    assert done.token_ids == [11, 12, 13] and done.logprobs == [-0.5, -1.25, 0.0]
    assert done.finish_reason == expected


def test_engine_tuples_and_json_lists_parse_alike() -> None:
    tuples = parse_completion(output([(-0.1, 4, "a"), (-0.2, 5, "b")], {"type": "length", "length": 2},
                                     completion_tokens=2))
    lists = parse_completion(output([[-0.1, 4, "a"], [-0.2, 5, "b"]], {"type": "length", "length": 2}))
    assert tuples == lists and tuples.token_ids == [4, 5]


def test_abort_and_unknown_finish_reasons_raise() -> None:
    with pytest.raises(SGLangError, match="aborted a request: out of memory"):
        parse_completion(output([], {"type": "abort", "message": "out of memory"}))
    with pytest.raises(DataError, match="'cancelled' is unknown"):
        parse_completion(output([], {"type": "cancelled"}))
    with pytest.raises(DataError, match="no finish_reason"):
        parse_completion(output([], None))


def test_malformed_outputs_raise_clear_errors() -> None:
    with pytest.raises(DataError, match="return_logprob=true"):
        parse_completion({"text": "", "meta_info": {"finish_reason": {"type": "length"}}})
    with pytest.raises(DataError, match=r"\(logprob, token_id, text\)"):
        parse_completion(output([["bad", 1, None]], {"type": "length"}))
    with pytest.raises(DataError, match=r"\(logprob, token_id, text\)"):
        parse_completion(output([[None, 1, None]], {"type": "length"}))
    with pytest.raises(DataError, match="3 completion tokens but 1"):
        parse_completion(output([[-1.0, 1, None]], {"type": "length"}, completion_tokens=3))
    with pytest.raises(DataError, match="no meta_info"):
        parse_completion({"text": "hi"})


def test_batch_answers_are_checked() -> None:
    one = output([[-1.0, 1, None]], {"type": "length", "length": 1})
    assert [c.token_ids for c in parse_generate([one, one], 2)] == [[1], [1]]
    with pytest.raises(DataError, match="1 outputs for 2 prompts"):
        parse_generate([one], 2)
    with pytest.raises(SGLangError, match="bad input"):
        parse_generate({"error": {"message": "bad input"}}, 1)


def test_update_results() -> None:
    check_result("x", (True, "ok"))
    check_result("x", (True, "ok", 0))
    check_result("x", {"success": True, "message": "ok"})
    check_result("x", None)
    with pytest.raises(SGLangError, match="update_weights_from_tensor failed: shape mismatch"):
        check_result("update_weights_from_tensor", (False, "shape mismatch"))
    with pytest.raises(SGLangError, match="failed: no group"):
        check_result("/update_weights_from_distributed", {"success": False, "message": "no group"})
    with pytest.raises(SGLangError, match="flush_cache failed"):
        check_result("flush_cache", type("Out", (), {"success": False})())


def test_weight_and_memory_payloads_match_the_schemas() -> None:
    assert validate("/update_weights_from_tensor", tensor_update_request(["a", "b"], False)) == []
    group = init_group_request("10.0.0.1", 29500, 1, 3, "g", "nccl")
    assert validate("/init_weights_update_group", group) == []
    assert group == {"master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 3,
                     "group_name": "g", "backend": "nccl"}
    dist = distributed_update_request(["w"], ["bfloat16"], [[2, 3]], "g", False)
    assert validate("/update_weights_from_distributed", dist) == []
    assert validate("/release_memory_occupation", memory_request(["weights", "kv_cache"])) == []
    assert memory_request(None) == {}
    with pytest.raises(RLCoreError, match="unknown SGLang memory tags"):
        memory_request(["cuda_graphs"])


def test_buckets_hold_at_most_the_budget_in_order() -> None:
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 20, 5, 100, 1, 1])]
    out = list(buckets(tensors, bucket_bytes=30 * 4))
    assert [[n for n, _ in b] for b in out] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [n for b in out for n, _ in b] == [n for n, _ in tensors], "every tensor once, in order"
    for b in out:
        size = sum(t.numel() * 4 for _, t in b)
        assert size <= 30 * 4 or len(b) == 1, "only a tensor bigger than the budget travels alone"
    assert list(buckets([], 100)) == []


def test_cast_converts_floating_tensors_only() -> None:
    out = dict(cast([("w", torch.ones(2, requires_grad=True)), ("ids", torch.arange(3))], torch.bfloat16))
    assert out["w"].dtype == torch.bfloat16 and not out["w"].requires_grad
    assert out["ids"].dtype == torch.int64
    assert dict(cast([("w", torch.ones(2))], None))["w"].dtype == torch.float32
