"""`algo.tis_cap: auto`: truncated importance sampling on wherever the rollout's and the trainer's logprobs come
from precisions that do not agree.

Two precisions make the two sides agree: float32 on both (they differ by float32's rounding only: ~3e-6 nats per
token between the hf rollout and the torch backend) and `bfloat16_matched` on both (the same bits by design;
README: "Precision"). Under any other pair, plain bfloat16 on both sides included (a cached decode and a full
forward round differently: ~0.04 nats on SmolLM2), the rollout samples from another policy than the trainer
scores, so `auto` weights the tokens by min(pi_trainer / pi_rollout, `AUTO_CAP`).

A side's precision is its section's `dtype` option; for a backend with FSDP's mixed precision, its
`param_dtype` where that is not float32 (the dtype its layers compute in; the lora backend refuses it over
its torch base). A side whose precision the config does not tell (its plugin names no `dtype`,
or an `auto` its plugin left unsettled) leaves it off; the run's measured-mismatch warning still watches it.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

log = logging.getLogger("rlcore")

AUTO_CAP = 2.0
"""The cap `auto` turns on: the one the mismatch warning and the README's asynchronous runs recommend."""
AGREEING = ("float32", "bfloat16_matched")
"""The precisions in which the rollout's logprobs equal the trainer's when both sides use the same one."""


@attrs.frozen
class TisChoice:
    """The cap `tis_cap: auto` stands for (None: off), and why, in one line."""

    cap: float | None
    reason: str


def choose_tis_cap(config: dict[str, Any]) -> TisChoice:
    """What `algo.tis_cap: auto` means in this resolved `config` (plain values, as config.yaml holds them,
    after the plugins settled their own `auto` options)."""
    sides = {section: (config.get(section) or {}).get("dtype") for section in ("backend", "rollout")}
    backend = config.get("backend") or {}
    if backend.get("param_dtype", "float32") != "float32":
        sides["backend"] = backend["param_dtype"]
    unknown = [f"{section}.dtype is {value!r}" for section, value in sides.items() if value in (None, "auto")]
    if unknown:
        return TisChoice(None, f"{' and '.join(unknown)}, so the two sides' precisions are not known")
    trainer, rollout = sides["backend"], sides["rollout"]
    if trainer == rollout and trainer in AGREEING:
        agree = "by design" if trainer == "bfloat16_matched" else "to float32's rounding"
        return TisChoice(None, f"both sides compute in {trainer}, whose logprobs agree {agree}")
    if trainer == rollout:
        return TisChoice(AUTO_CAP, f"{trainer} on both sides still rounds differently in the trainer's forward and "
                                   f"the rollout's decode, so their logprobs differ")
    return TisChoice(AUTO_CAP, f"the trainer computes in {trainer} and the rollout in {rollout}, so their "
                               f"logprobs differ")


def settle_tis_cap(config: dict[str, Any]) -> float | None:
    """`choose_tis_cap`'s cap, said on the console with its reason."""
    choice = choose_tis_cap(config)
    log.info("algo.tis_cap=auto is %s: %s", "off" if choice.cap is None else choice.cap, choice.reason)
    return choice.cap
