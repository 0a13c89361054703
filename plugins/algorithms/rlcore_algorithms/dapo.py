"""DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476.
GRPO plus clip-higher (0.2 / 0.28), dynamic sampling (zero-variance groups dropped and refilled by the
core), token-level loss aggregation and soft overlong punishment; no KL term."""

from __future__ import annotations

import attrs

from rlcore.config import check_range
from rlcore_algorithms.grpo import GRPO


class DAPO(GRPO):
    """GRPO's advantage and clipped surrogate with DAPO's defaults switched on."""

    @attrs.define
    class Options(GRPO.Options):
        clip_high: float = attrs.field(default=0.28, validator=check_range(0.0))
        """Clip-higher: a larger upper clip lets low-probability tokens grow (keeps entropy up)."""
        dynamic_sampling: bool = True
        """Drop groups whose rewards are all equal; the core samples more prompts to refill the batch."""
        overlong_buffer: int | None = attrs.field(default=None, validator=check_range(0))
        """Soft overlong punishment over the last this-many tokens of the budget; None: a fifth of the
        budget, rounded down (the paper's 4096 of 20480); 0: off."""
