"""SGLang's documented request and response schemas, shared by the offline engine and the HTTP client.

`POST /generate` and `Engine.generate` take the same fields (`io_struct.GenerateReqInput`): a batch of
`input_ids`, `sampling_params` (one dict, or one per row) and `return_logprob`. Each output has
`meta_info.output_token_logprobs`, one `(logprob, token_id, text)` per generated token (lists in JSON),
and `meta_info.finish_reason`: `{"type": "stop", "matched": <token id>}` for EOS, `{"type": "stop",
"matched": "<stop string>"}`, `{"type": "length", "length": n}` or `{"type": "abort", "message": ...}`.

SGLang reports the logprob of softmax(logits / temperature) before top-p (unless the server runs with
`SGLANG_RETURN_ORIGINAL_LOGPROB=1`), and of the plain logits when greedy: what rlcore's trainers compute.
"""

from __future__ import annotations

from typing import Any

from rlcore import SamplingParams
from rlcore.errors import DataError, RLCoreError
from rlcore_backends.rollout.engine import Completion

MEMORY_TAGS = ("weights", "kv_cache")
"""The memory regions `release_memory_occupation` / `resume_memory_occupation` take as `tags`."""


class SGLangError(RLCoreError):
    """SGLang refused or failed a request (the message names the endpoint and SGLang's answer)."""


def sampling_params(params: SamplingParams, seed: int | None = None) -> dict[str, Any]:
    """One row's `sampling_params`: exactly what `params` say, every other control neutral.

    Top-k, min-p and penalties are set explicitly because SGLang otherwise takes them from the model's
    `generation_config.json` (`--sampling-defaults model`); `n` is never sent (rows are repeated instead,
    as SGLang recommends). `seed` becomes `sampling_seed` (honoured by SGLang versions that have it).
    """
    out: dict[str, Any] = {
        "temperature": params.temperature, "top_p": params.top_p, "top_k": -1, "min_p": 0.0,
        "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "max_new_tokens": params.max_new_tokens, "min_new_tokens": params.min_new_tokens,
    }
    if params.stop:
        out["stop"] = list(params.stop)
    if seed is not None:
        out["sampling_seed"] = seed
    return out


def generate_request(prompts: list[list[int]], params: SamplingParams,
                     image_data: list[list[Any]] | None = None) -> dict[str, Any]:
    """The `/generate` body (and `Engine.generate` keyword arguments) for one completion per prompt.

    With `params.seed`, row i samples with seed `params.seed + i`, so repeated prompts still differ.
    `image_data` (vision-language models) holds each row's images, in the order of its image placeholders
    (PIL images for the Engine, data URLs over HTTP; an empty list for a row without images); the rows'
    `input_ids` carry the placeholders already expanded, as the model's processor renders them.
    """
    if not prompts or any(not p for p in prompts):
        raise DataError("SGLang needs at least one prompt, and every prompt needs at least one token")
    if params.seed is None:
        sp: dict[str, Any] | list[dict[str, Any]] = sampling_params(params)
    else:
        sp = [sampling_params(params, params.seed + i) for i in range(len(prompts))]
    request = {"input_ids": [list(map(int, p)) for p in prompts], "sampling_params": sp, "return_logprob": True}
    if image_data is not None:
        if len(image_data) != len(prompts):
            raise DataError(f"SGLang needs one image list per prompt: {len(prompts)} prompts, {len(image_data)} lists")
        request["image_data"] = [list(images) for images in image_data]
    return request


def finish_reason(meta: dict[str, Any]) -> str:
    """rlcore's finish reason ("eos", "stop", "length") of one output's `meta_info`."""
    reason = meta.get("finish_reason")
    if not isinstance(reason, dict) or "type" not in reason:
        raise DataError(f"SGLang output has no finish_reason ({reason!r}): was the request streamed or cut off?")
    kind = reason["type"]
    if kind == "length":
        return "length"
    if kind == "stop":
        return "stop" if isinstance(reason.get("matched"), str) else "eos"
    if kind == "abort":
        raise SGLangError(f"SGLang aborted a request: {reason.get('message') or reason}. Check the server log "
                          "(out of KV-cache memory, a prompt longer than the context length, a weight update "
                          "that aborted running requests)")
    raise DataError(f"SGLang finish_reason type {kind!r} is unknown; expected stop, length or abort")


def parse_completion(output: Any) -> Completion:
    """One `/generate` output -> `Completion`: token ids and logprobs from `output_token_logprobs`."""
    meta = output.get("meta_info") if isinstance(output, dict) else None
    if not isinstance(meta, dict):
        raise DataError(f"SGLang output has no meta_info: {str(output)[:200]}")
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise DataError("SGLang output has no meta_info.output_token_logprobs: the request must set "
                        "return_logprob=true")
    try:
        logprobs = [float(e[0]) for e in entries]
        token_ids = [int(e[1]) for e in entries]
    except (TypeError, ValueError, IndexError):
        raise DataError(f"SGLang output_token_logprobs must hold (logprob, token_id, text) entries, got "
                        f"{str(entries)[:200]}") from None
    count = meta.get("completion_tokens")
    if count is not None and count != len(token_ids):
        raise DataError(f"SGLang reports {count} completion tokens but {len(token_ids)} token logprobs")
    return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=finish_reason(meta))


def parse_generate(outputs: Any, rows: int) -> list[Completion]:
    """The `/generate` answer for a batch of `rows` prompts -> one `Completion` per prompt, in order."""
    if isinstance(outputs, dict) and "error" in outputs:
        raise SGLangError(f"SGLang /generate failed: {error_message(outputs)}")
    if not isinstance(outputs, list) or len(outputs) != rows:
        got = f"{len(outputs)} outputs" if isinstance(outputs, list) else type(outputs).__name__
        raise DataError(f"SGLang /generate returned {got} for {rows} prompts")
    return [parse_completion(o) for o in outputs]


def error_message(body: Any) -> str:
    """The readable part of an SGLang error body (`{"error": {"message": ...}}`, `{"message": ...}`, text)."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in body:
            return str(body["message"])
    return str(body)[:500]


def check_result(endpoint: str, result: Any) -> None:
    """Raise `SGLangError` when a weight or memory call answered failure.

    The engine returns `(success, message[, ...])` tuples, an object with `success`, or None; the server
    returns `{"success": ..., "message": ...}` (weight updates) or null (memory calls).
    """
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], bool):
        ok, message = result[0], result[1] if len(result) > 1 else ""
    elif isinstance(result, dict) and "success" in result:
        ok, message = bool(result["success"]), result.get("message", "")
    elif hasattr(result, "success"):
        ok, message = bool(result.success), getattr(result, "message", "")
    else:
        return
    if not ok:
        raise SGLangError(f"SGLang {endpoint} failed: {message}")


def init_group_request(master_address: str, master_port: int, rank_offset: int, world_size: int,
                       group_name: str, backend: str) -> dict[str, Any]:
    """`/init_weights_update_group`: the engine's TP ranks join as ranks rank_offset.. of the group."""
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def distributed_update_request(names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                               flush_cache: bool) -> dict[str, Any]:
    """`/update_weights_from_distributed`: the tensors rank 0 broadcasts next, in this order."""
    return {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name, "flush_cache": flush_cache}


def tensor_update_request(serialized: list[str], flush_cache: bool) -> dict[str, Any]:
    """`/update_weights_from_tensor`: one `MultiprocessingSerializer` payload per TP rank."""
    return {"serialized_named_tensors": serialized, "load_format": None, "flush_cache": flush_cache}


def disk_update_request(model_path: str) -> dict[str, Any]:
    """`/update_weights_from_disk`: reload the weights from a model directory."""
    return {"model_path": model_path, "load_format": None}


def memory_request(tags: list[str] | None) -> dict[str, Any]:
    """`/release_memory_occupation` and `/resume_memory_occupation` (no tags: every region)."""
    unknown = [t for t in tags or [] if t not in MEMORY_TAGS]
    if unknown:
        raise RLCoreError(f"unknown SGLang memory tags {unknown}; use {list(MEMORY_TAGS)}")
    return {} if tags is None else {"tags": list(tags)}
