"""A test-only rollout: each prompt's responses come from a JSON file ({prompt id: [text, ...]}), so that a
test can put chosen (hostile) responses through the real `rlcore eval` / `rlcore run` commands."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import attrs

from rlcore import Prompt, RolloutBatch, SamplingParams, hookimpl
from rlcore.testing import make_batch


class ScriptedRollout:
    """Sample j of a prompt is the (j mod count)-th response listed for its id."""

    @attrs.define
    class Options:
        responses: str = ""
        """The JSON file of responses by prompt id."""

    def __init__(self, options: Options) -> None:
        self.responses = json.loads(Path(options.responses).read_text())

    @hookimpl
    def sample(self, prompts: Sequence[Prompt], params: SamplingParams, tools: Sequence) -> RolloutBatch:
        batch = make_batch(groups=len(prompts), n=params.n)
        batch.prompts = [p for p in prompts for _ in range(params.n)]
        batch.texts = [self.responses[p.id][j % len(self.responses[p.id])] for p in prompts for j in range(params.n)]
        return batch
