"""Held LR schedule steps and loading trainable weights (Polyak averages) into a running engine."""
import pytest
import torch

from training import Engine, EngineConfig, OptimConfig, ScheduleConfig

from training_tiny import lm_loss, make_model, make_rows, partition_everything_under_zero3, split

SCHED = ScheduleConfig(warmup_steps=2, decay="cosine", min_lr_ratio=0.1)


def test_held_steps_leave_the_schedule_in_place(tmp_path):
    engine = Engine(make_model(), EngineConfig(), OptimConfig(lr=1e-2), SCHED, total_steps=6, run_dir=tmp_path)
    ref = Engine(make_model(), EngineConfig(), OptimConfig(lr=1e-2), SCHED, total_steps=6, run_dir=tmp_path / "r")
    lrs, ref_lrs = [], []
    for s in range(3):
        lrs.append(engine.train_step([make_rows(s, 2)], lm_loss).lr)
        ref_lrs.append(ref.train_step([make_rows(s, 2)], lm_loss).lr)
    held = [engine.train_step([make_rows(10 + s, 2)], lm_loss, advance_schedule=False).lr for s in range(2)]
    assert held == [engine.lr, engine.lr] == [ref.lr, ref.lr]  # the LR the planned step 3 will use
    for s in range(3, 6):
        lrs.append(engine.train_step([make_rows(s, 2)], lm_loss).lr)
        ref_lrs.append(ref.train_step([make_rows(s, 2)], lm_loss).lr)
    assert lrs == pytest.approx(ref_lrs, rel=1e-12)
    assert engine.step == 8 and ref.step == 6


def test_load_trainable_state_dict_torch(tmp_path):
    engine = Engine(make_model(frozen=("embed",)), EngineConfig(), OptimConfig(), SCHED, total_steps=4, run_dir=tmp_path)
    state = {k: torch.full_like(v, 0.5) for k, v in engine.trainable_state_dict().items()}
    engine.load_trainable_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in engine.trainable_state_dict().items())
    assert "embed.weight" not in state
    with pytest.raises(Exception, match="shape mismatch"):
        engine.load_trainable_state_dict({k: v[..., :1] for k, v in state.items()})


@pytest.mark.parametrize("stage", [2, 3])
def test_load_trainable_state_dict_deepspeed(tmp_path, stage, monkeypatch):
    pytest.importorskip("deepspeed")
    from training import backend_deepspeed
    partition_everything_under_zero3(backend_deepspeed)
    engine = Engine(make_model(frozen=("embed",)), EngineConfig(backend="deepspeed", zero_stage=stage),
                    OptimConfig(), SCHED, total_steps=4, run_dir=tmp_path)
    try:
        engine.train_step(split(make_rows(0, 4), 1), lm_loss)
        state = {k: torch.full_like(v, 0.25) for k, v in engine.trainable_state_dict().items()}
        engine.load_trainable_state_dict(state)
        assert all(torch.allclose(v, state[k]) for k, v in engine.trainable_state_dict().items())
        with torch.no_grad():  # the module computes with the new weights
            logits = engine.model(make_rows(1, 1)["tokens"])
        ref = make_model(frozen=("embed",))
        ref.load_state_dict(state, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(logits, ref(make_rows(1, 1)["tokens"]), atol=1e-5, rtol=1e-5)
    finally:
        engine.close()
