import dataclasses
import math
import typing

import pytest
import torch

from training import EngineConfig, OptimConfig, ScheduleConfig, lr_factor
from training.config import validate
from training.schedule import build_scheduler


def factor(step, **kw):
    args = dict(warmup_steps=10, total_steps=110, decay="cosine", min_lr_ratio=0.1, anneal_steps=0)
    args.update(kw)
    return lr_factor(step, **args)


def test_warmup_is_linear_and_reaches_peak():
    assert factor(0) == pytest.approx(0.1)
    assert factor(4) == pytest.approx(0.5)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)


def test_cosine_decays_to_min_lr_ratio():
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way
    assert factor(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert factor(110) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)  # past the end: stays at the floor


def test_linear_and_constant_decay():
    assert factor(60, decay="linear") == pytest.approx(1 - 0.9 * 0.5)
    assert factor(110, decay="linear") == pytest.approx(0.1)
    assert factor(60, decay="constant") == 1.0


def test_anneal_goes_linearly_to_zero_from_the_decayed_value():
    kw = dict(anneal_steps=20)  # decay ends at step 90
    assert factor(50, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine half-way between 10 and 90
    assert factor(90, **kw) == pytest.approx(0.1)               # first anneal step: the decay's last value
    assert factor(100, **kw) == pytest.approx(0.1 * 10 / 20)
    assert factor(109, **kw) == pytest.approx(0.1 * 1 / 20)
    assert factor(110, **kw) == 0.0
    # constant decay + anneal = Llama 3 style "hold, then anneal linearly to 0"
    assert factor(100, decay="constant", **kw) == pytest.approx(0.5)


def test_scheduler_applies_factor_per_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=4, decay="linear", min_lr_ratio=0.0), total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_config_fields_are_typed_with_help_and_ranges():
    allowed = {int, float, bool, str}
    for cls in (OptimConfig, ScheduleConfig, EngineConfig):
        for f in dataclasses.fields(cls):
            assert "help" in f.metadata, f"{cls.__name__}.{f.name} has no help"
            t = f.type
            assert t in allowed or typing.get_origin(t) in (typing.Literal, list, dict), f"{cls.__name__}.{f.name}: {t}"
    assert OptimConfig().betas == [0.9, 0.95]
    assert dict(dataclasses.fields(EngineConfig)[3].metadata)["range"] == (0, 3)


def test_validate_names_the_bad_key():
    with pytest.raises(ValueError, match="zero_stage"):
        validate(EngineConfig(zero_stage=2), OptimConfig(), ScheduleConfig(), 100)
    with pytest.raises(ValueError, match="warmup_steps"):
        validate(EngineConfig(), OptimConfig(), ScheduleConfig(warmup_steps=80, anneal_steps=30), 100)
    with pytest.raises(ValueError, match="betas"):
        validate(EngineConfig(), OptimConfig(betas=[0.9]), ScheduleConfig(), 100)
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        validate(EngineConfig(backend="deepspeed", precision="bf16"), OptimConfig(), ScheduleConfig(), 100)
