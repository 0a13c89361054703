"""Loss aggregation modes by hand, and invariance of loss, metrics and gradients to micro-batch splits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcore.types import LossInputs, LossNorm
from rlcore.toolkit import AGG_MODES, aggregate, ClippedSurrogateLoss, GMPOLoss, GSPOLoss, KLController

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, math.nan], [7.0, 7.0, 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # last row: empty response


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 15 / 5),
    ("seq-mean-token-sum", (6 + 9) / 2),
    ("seq-mean-token-mean", (6 / 3 + 9 / 2) / 2),
    ("seq-mean-token-sum-norm", 15 / (2 * 4)),
])
def test_modes_by_hand(mode, expected):
    norm = LossNorm(tokens=5, sequences=2, max_response_length=4)
    assert aggregate(VALUES, MASK, mode, norm).item() == pytest.approx(expected)


def test_all_masked_is_zero_not_nan():
    norm = LossNorm(tokens=0, sequences=0, max_response_length=3)
    for mode in AGG_MODES:
        assert aggregate(VALUES, torch.zeros(3, 3), mode, norm).item() == 0.0


def test_unknown_mode_names_choices():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(VALUES, MASK, "sum", LossNorm(5, 2, 3))


LOSSES = [ClippedSurrogateLoss(agg=mode, clip_low=0.2, clip_high=0.28, kl=KLController(0.1), entropy_coef=0.01,
                              tis_cap=2.0)
          for mode in AGG_MODES] + [GSPOLoss(clip_low=0.05, clip_high=0.05, kl=KLController(0.1), kl_estimator="k2"),
                                    GMPOLoss(entropy_coef=0.01, tis_cap=1.5)]


def random_inputs(rows: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).double()
    mask[torch.rand(rows, width, generator=g) < 0.15] = 0.0  # masked tool-output tokens
    lp = lambda: -torch.rand(rows, width, generator=g, dtype=torch.float64) * 3  # noqa: E731
    return {"logprobs": lp(), "old_logprobs": lp(), "ref_logprobs": lp(), "rollout_logprobs": lp(),
            "advantages": torch.randn(rows, width, generator=g, dtype=torch.float64),
            "entropy": torch.rand(rows, width, generator=g, dtype=torch.float64), "mask": mask}


def run(loss, data: dict[str, torch.Tensor], norm: LossNorm, rows: slice, trim: bool):
    """Loss, metrics and gradients (w.r.t. logprobs and entropy) of the rows `rows`, optionally cut to
    the widest response among them as a token-budget micro-batcher does."""
    part = {k: v[rows] for k, v in data.items()}
    if trim:
        used = torch.nonzero(part["mask"].sum(0)).flatten()
        width = int(used.max()) + 1 if used.numel() else 1
        part = {k: v[:, :width] for k, v in part.items()}
    lp = part["logprobs"].clone().requires_grad_()
    ent = part["entropy"].clone().requires_grad_()
    value, metrics = loss(LossInputs(**{**part, "logprobs": lp, "entropy": ent}), norm)
    value.backward()
    pad = data["mask"].shape[1] - lp.shape[1]
    grads = [torch.nn.functional.pad(t.grad, (0, pad)) for t in (lp, ent)]
    return value.detach(), metrics, grads


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 7), width=st.integers(1, 6), seed=st.integers(0, 10_000),
       cuts=st.lists(st.integers(1, 6), max_size=4), trim=st.booleans())
def test_split_gives_same_loss_metrics_and_gradients(rows, width, seed, cuts, trim):
    data = random_inputs(rows, width, seed)
    m = data["mask"]
    norm = LossNorm(tokens=float(m.sum()), sequences=float((m.sum(-1) > 0).sum()), max_response_length=width + 2)
    bounds = sorted({0, rows, *[c for c in cuts if c < rows]})
    for loss in LOSSES:
        whole, whole_metrics, whole_grads = run(loss, data, norm, slice(0, rows), trim=False)
        parts = [run(loss, data, norm, slice(a, b), trim) for a, b in zip(bounds, bounds[1:])]
        torch.testing.assert_close(sum(p[0] for p in parts), whole)
        for name, value in whole_metrics.items():
            torch.testing.assert_close(sum(p[1][name] for p in parts), value, msg=name)
        for i, grad in enumerate(whole_grads):
            torch.testing.assert_close(torch.cat([p[2][i] for p in parts]), grad)
        assert torch.isfinite(whole) and all(torch.isfinite(g).all() for g in whole_grads)
