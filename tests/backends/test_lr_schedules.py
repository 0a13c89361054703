"""Learning-rate schedules: Hugging Face's `get_scheduler` formulas after warmup, rlcore's warmup, options,
and an exact resume in the torch backend (fsdp, lora and megatron run them in their own tests' options)."""

from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch
from policy_losses import TokenMeanPG
from transformers import get_scheduler

from rlcore import RolloutBatch, UpdatePlan
from rlcore.config import build_options
from rlcore.context import RunContext
from rlcore.errors import ConfigError
from rlcore_backends.common.train_options import (LRSchedule, OptimizerOptions, ScheduledLR, build_optimizer,
                                                  planned_steps, schedule_of, with_run_length)
from rlcore_backends.update.torch.backend import TorchBackend

LR = 0.5
TOTAL = 20


def lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int = TOTAL) -> list[float]:
    """The LR each of `steps` optimizer steps runs at (the scheduler stepped after each, as backends do)."""
    optimizer = scheduler.optimizer
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)


def ours(kind: str, warmup: int = 0, min_ratio: float = 0.0) -> list[float]:
    return lrs(ScheduledLR(optimizer(), LRSchedule(kind, warmup, TOTAL, min_ratio)))


def hf(name: str, warmup: int = 0, **kwargs: float) -> list[float]:
    return lrs(get_scheduler(name, optimizer(), num_warmup_steps=warmup, num_training_steps=TOTAL,
                             scheduler_specific_kwargs=kwargs or None))


@pytest.mark.parametrize(("kind", "name", "kwargs"), [
    ("constant", "constant_with_warmup", {}), ("linear", "linear", {}), ("cosine", "cosine", {}),
    ("cosine", "cosine_with_min_lr", {"min_lr_rate": 0.1}),
])
@pytest.mark.parametrize("warmup", [0, 5])
def test_after_warmup_each_schedule_is_hugging_faces(kind: str, name: str, kwargs: dict, warmup: int) -> None:
    got = ours(kind, warmup, kwargs.get("min_lr_rate", 0.0))
    want = hf(name, warmup, **kwargs)
    assert got[warmup:] == pytest.approx(want[warmup:], rel=1e-12, abs=1e-15)
    assert len(set(got)) > 2 or kind == "constant"


def test_warmup_rises_linearly_from_lr_over_warmup_never_zero() -> None:
    got = ours("cosine", warmup=4, min_ratio=0.2)
    assert got[:5] == pytest.approx([LR * 1 / 4, LR * 2 / 4, LR * 3 / 4, LR, LR])
    # Hugging Face and verl start at 0: step s gets s / warmup; rlcore's step s gets (s + 1) / warmup
    assert hf("cosine_with_min_lr", 4, min_lr_rate=0.2)[1:4] == pytest.approx(got[:3])


def test_linear_decay_ends_at_the_minimum_ratio() -> None:
    """Closed form: lr * (m + (1 - m) * (1 - p)), p = (s - W) / (T - W); at s = T the LR is m * lr."""
    schedule = LRSchedule("linear", warmup=2, total=10, min_ratio=0.25)
    for s in range(2, 12):
        p = min(1.0, (s - 2) / 8)
        assert schedule.factor(s) == pytest.approx(0.25 + 0.75 * (1 - p))
    assert schedule.factor(10) == schedule.factor(50) == pytest.approx(0.25)
    cosine = LRSchedule("cosine", 0, 10, 0.25)
    assert cosine.factor(5) == pytest.approx(0.25 + 0.75 * 0.5) and cosine.factor(10) == pytest.approx(0.25)


def test_options_fill_the_length_from_the_run_and_reject_what_cannot_work() -> None:
    config = {"trainer": {"steps": 10, "epochs": 2, "mini_batches": 3}}
    assert planned_steps(config) == 60 and planned_steps({}) is None
    options = build_options(OptimizerOptions, {"lr_scheduler_type": "cosine", "warmup_ratio": 0.1}, "backend")
    filled = with_run_length(options, config)
    assert filled.total_training_steps == 60 and schedule_of(filled) == LRSchedule("cosine", 6, 60, 0.0)
    explicit = build_options(OptimizerOptions, {"lr_scheduler_type": "linear", "total_training_steps": 7}, "backend")
    assert with_run_length(explicit, config) is explicit
    constant = OptimizerOptions()
    assert with_run_length(constant, {}) is constant and schedule_of(constant) == LRSchedule()
    with pytest.raises(ConfigError, match="needs the schedule's length .* set backend.total_training_steps"):
        with_run_length(options, {})
    with pytest.raises(ConfigError, match="warmup_steps=3 and warmup_ratio=0.1 both set the warmup"):
        build_options(OptimizerOptions, {"warmup_steps": 3, "warmup_ratio": 0.1}, "backend")
    with pytest.raises(ConfigError, match="lr_scheduler_type: expected one of 'constant', 'linear', 'cosine', got 'step'"):
        build_options(OptimizerOptions, {"lr_scheduler_type": "step"}, "backend")


def test_the_checkpoint_names_the_schedule_and_a_changed_one_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    opt, schedule = optimizer(), LRSchedule("cosine", 1, 8, 0.1)
    first = ScheduledLR(opt, schedule)
    lrs(first, 3)
    state = first.state_dict()
    assert state["schedule"] == {"kind": "cosine", "warmup": 1, "total": 8, "min_ratio": 0.1}
    same = ScheduledLR(optimizer(), schedule)
    same.optimizer.load_state_dict(opt.state_dict())  # as every backend restores both
    same.load_state_dict(state)
    assert lrs(same, 5) == pytest.approx(lrs(first, 5)) and not caplog.records
    longer = ScheduledLR(optimizer(), LRSchedule("cosine", 1, 16, 0.1))
    longer.load_state_dict(state)
    assert "the LR schedule differs from the checkpoint's" in caplog.text and "optimizer step 3" in caplog.text


def test_torch_backend_resumes_the_cosine_schedule_exactly(make_backend: Callable[..., TorchBackend],
                                                           batch: RolloutBatch, tmp_path: Path) -> None:
    options = {"lr": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 1, "min_lr_ratio": 0.1,
               "total_training_steps": 5}
    plan, loss = UpdatePlan(), TokenMeanPG()
    full = make_backend(**options)
    want = [full.update(batch=batch, loss=loss, plan=plan)["lr"] for _ in range(5)]
    schedule = LRSchedule("cosine", 1, 5, 0.1)
    assert want == pytest.approx([1e-3 * schedule.factor(s) for s in range(5)])
    first = make_backend(**options)
    got = [first.update(batch=batch, loss=loss, plan=plan)["lr"] for _ in range(2)]
    first.save_state(directory=tmp_path)
    resumed = make_backend(**options)
    resumed.load_state(directory=tmp_path)
    got += [resumed.update(batch=batch, loss=loss, plan=plan)["lr"] for _ in range(3)]
    assert got == want


def test_a_run_config_sets_the_torch_backends_schedule_length(rlcore_context: RunContext) -> None:
    ctx = attrs.evolve(rlcore_context, config={"trainer": {"steps": 4, "epochs": 1, "mini_batches": 2}})
    backend = TorchBackend(TorchBackend.Options(lr_scheduler_type="linear"))
    backend.setup(ctx=ctx)
    assert backend.options.total_training_steps == 8 and backend.scheduler.state_dict()["schedule"]["total"] == 8
    _, scheduler = build_optimizer(backend.model.parameters(), backend.options)
    assert scheduler.state_dict()["schedule"]["kind"] == "linear"
