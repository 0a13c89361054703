"""`build_batch`: completions of any engine become the documented RolloutBatch layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rlcore import Prompt, SamplingParams
from rlcore.errors import RLCoreError
from rlcore.testing import make_prompts
from rlcore_backends.rollout.engine import Completion, build_batch


@pytest.fixture
def tok(rlcore_tiny_model: Path) -> Any:
    from rlcore.models import load_tokenizer
    return load_tokenizer(str(rlcore_tiny_model))


def test_layout(tok: Any) -> None:
    prompts = make_prompts(2)
    prompt_ids = [[5, 6], [5, 6], [7, 8, 9], [7, 8, 9]]
    completions = [Completion([3, 4, 1], [-0.1, -0.2, -0.3], "eos"), Completion([3], [-1.0], "length"),
                   Completion([], [], "stop"), Completion([4, 4], [-0.5, -0.6], "stop")]
    batch = build_batch(prompts, prompt_ids, completions, tok, SamplingParams(temperature=0.0), n=2,
                        loss_masks=[[1, 0, 1], [1], [], [0, 1]], info=[{"k": i} for i in range(4)])
    batch.validate()
    pad = tok.pad_token_id
    assert batch.prompt_ids.tolist() == [[pad, 5, 6], [pad, 5, 6], [7, 8, 9], [7, 8, 9]]
    assert batch.prompt_mask.tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert batch.response_ids.tolist() == [[3, 4, 1], [3, pad, pad], [pad, pad, pad], [4, 4, pad]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]]
    assert batch.response_mask.tolist() == [[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]]
    torch.testing.assert_close(batch.rollout_logprobs, torch.tensor(
        [[-0.1, -0.2, -0.3], [-1.0, 0, 0], [0, 0, 0], [-0.5, -0.6, 0]]))
    assert batch.group_ids.tolist() == [0, 0, 1, 1] and batch.prompts == [prompts[0]] * 2 + [prompts[1]] * 2
    assert batch.truncated.tolist() == [False, True, False, False]
    assert batch.texts == [tok.decode([3, 4]), tok.decode([3]), "", tok.decode([4, 4])], "specials are skipped"
    assert batch.info[1] == {"finish_reason": "length", "k": 1}
    assert batch.temperature == 1.0, "greedy sampling reports logprobs at temperature 1"


def test_all_empty_responses_keep_one_column(tok: Any) -> None:
    batch = build_batch(make_prompts(1), [[5]], [Completion([], [], "eos")], tok, SamplingParams(), n=1)
    batch.validate()
    assert batch.response_ids.shape == (1, 1) and batch.attention_mask.sum() == 0


@pytest.mark.parametrize(("completions", "masks", "match"), [
    ([Completion([1], [-1.0], "eos")], None, "needs 2 samples per prompt"),
    ([Completion([1], [-1.0], "eos"), Completion([1, 2], [-1.0], "eos")], None, "one logprob and one loss-mask"),
    ([Completion([1], [-1.0], "eos")] * 2, [[1], [1, 1]], "one logprob and one loss-mask"),
    ([Completion([1], [-1.0], "eos"), Completion([1], [-1.0], "done")], None, "finish_reason must be one of"),
])
def test_malformed_completions_are_refused(tok: Any, completions: list[Completion], masks: Any, match: str) -> None:
    with pytest.raises(RLCoreError, match=match):
        build_batch([Prompt(messages=[])], [[5], [5]], completions, tok, SamplingParams(), n=2, loss_masks=masks)
