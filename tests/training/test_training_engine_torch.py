"""Torch backend: optimizer contents, token weighting, non-finite handling, bf16, activation checkpointing."""

import logging

import pytest
import torch

from training import CheckpointError, Engine, EngineConfig, OptimConfig, ScheduleConfig, TrainingError

from training_tiny import LOSS_ATOL, WEIGHT_ATOL, lm_loss, make_model, make_rows, split

SCHED = ScheduleConfig(warmup_steps=0, decay="constant")


def engine_for(model, tmp_path, total_steps=10, optim=None, **cfg):
    return Engine(model, EngineConfig(**cfg), optim or OptimConfig(lr=1e-2), SCHED, total_steps, tmp_path)


def test_frozen_params_never_reach_the_optimizer(tmp_path):
    model = make_model(frozen=("embed", "blocks.0"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    engine = engine_for(model, tmp_path)
    opt = engine.backend.optimizer
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad, name
    # no weight decay on 1-D params (norms, biases), decay on matrices
    for g in opt.param_groups:
        assert all(p.ndim >= 2 for p in g["params"]) if g["weight_decay"] > 0 else all(p.ndim < 2 for p in g["params"])
    losses = [engine.train_step(split(make_rows(s, 4), 2), lm_loss).loss for s in range(5)]
    assert losses[-1] < losses[0]
    assert engine.step == 5
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name
            assert p not in opt.state, name
    assert len(opt.state) == sum(p.requires_grad for p in model.parameters())


def test_lr_scale_groups_scale_the_lr_and_survive_a_resume(tmp_path):
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, lr_scale={"blocks.1": 10.0, "head.bias": 0.0})
    sched = ScheduleConfig(warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
    model = make_model()
    head_bias = model.head.bias.detach().clone()
    engine = Engine(model, EngineConfig(), optim, sched, 6, tmp_path / "a")
    groups = {(round(g["lr"] / engine.backend.optimizer.param_groups[0]["lr"], 6), g["weight_decay"]): len(g["params"])
              for g in engine.backend.optimizer.param_groups}
    n_block1 = [p.ndim >= 2 for n, p in model.named_parameters() if n.startswith("blocks.1")]
    assert groups == {(1.0, 0.1): groups[(1.0, 0.1)], (1.0, 0.0): groups[(1.0, 0.0)],
                      (10.0, 0.1): sum(n_block1), (10.0, 0.0): len(n_block1) - sum(n_block1), (0.0, 0.0): 1}
    for step in range(3):
        engine.train_step(split(make_rows(step, 4), 2), lm_loss)
    lrs = [g["lr"] for g in engine.backend.optimizer.param_groups]
    assert lrs[2] == pytest.approx(10 * lrs[0]) and engine.lr == pytest.approx(lrs[0])  # the schedule keeps the ratio
    assert torch.equal(model.head.bias, head_bias)  # factor 0: never moves
    engine.save_checkpoint({"next_step": 3})
    again = Engine(make_model(seed=1), EngineConfig(), optim, sched, 6, tmp_path / "a")
    assert again.resume() == {"next_step": 3}
    assert [g["lr"] for g in again.backend.optimizer.param_groups] == pytest.approx(lrs)
    with pytest.raises(CheckpointError, match="parameter groups do not match"):  # a resume under other factors is refused
        Engine(make_model(), EngineConfig(), OptimConfig(lr=1e-2), sched, 6, tmp_path / "a").resume()
    with pytest.raises(ValueError, match="lr_scale"):
        OptimConfig(lr_scale={"head": -1.0})


def test_grad_accumulation_invariance(tmp_path):
    """1 x 8 rows vs 4 x 2 rows: the same token-weighted mean, the same update (fp32, to float32 rounding)."""
    results = []
    for n_micro in (1, 4):
        model = make_model()
        engine = engine_for(model, tmp_path / str(n_micro), optim=OptimConfig(lr=1e-2, grad_clip=0.5))
        steps = [engine.train_step(split(make_rows(s, 8), n_micro), lm_loss) for s in range(3)]
        results.append((steps, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (a_steps, a_w), (b_steps, b_w) = results
    for a, b in zip(a_steps, b_steps):
        assert a.tokens == b.tokens
        assert a.loss == pytest.approx(b.loss, abs=LOSS_ATOL)  # float32 sums of 64 vs 4 x 16 tokens
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)  # same norm code; grads differ by <= 64*u
    for name in a_w:
        torch.testing.assert_close(a_w[name], b_w[name], atol=WEIGHT_ATOL, rtol=0)


def test_unequal_micro_batches_are_token_weighted(tmp_path):
    """The loss is sum(losses) / sum(tokens), not the mean of per-micro-batch means."""
    model = make_model()
    engine = engine_for(model, tmp_path)
    rows = make_rows(0, 4)
    micro = [{k: v[:1] for k, v in rows.items()}, {k: v[1:] for k, v in rows.items()}]
    with torch.no_grad():
        sums = [lm_loss(model, m) for m in micro]
    expected = sum(float(s) for s, _ in sums) / sum(int(n) for _, n in sums)
    result = engine.train_step(micro, lm_loss)
    assert result.loss == pytest.approx(expected, abs=1e-6)
    assert result.tokens == int((rows["labels"] != -100).sum())


def nan_loss(model, batch):
    loss_sum, n = lm_loss(model, batch)
    return loss_sum * float("nan"), n


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, caplog):
    model = make_model()
    engine = engine_for(model, tmp_path, max_nonfinite_in_a_row=2)
    engine.train_step([make_rows(0, 2)], lm_loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_state = {k: v["exp_avg"].clone() for k, v in engine.backend.optimizer.state.items()}
    lr = engine.lr
    with caplog.at_level(logging.WARNING, logger="herd.training"):
        r = engine.train_step([make_rows(1, 2)], nan_loss)
    assert r.skipped and engine.step == 1 and engine.skipped_total == 1
    assert "skipped step 1" in caplog.text
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name
    for k, v in engine.backend.optimizer.state.items():
        assert torch.equal(v["exp_avg"], opt_state[k])
    assert engine.lr == lr
    # a good step resets the streak
    assert not engine.train_step([make_rows(2, 2)], lm_loss).skipped
    engine.train_step([make_rows(3, 2)], nan_loss)
    engine.train_step([make_rows(4, 2)], nan_loss)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        engine.train_step([make_rows(5, 2)], nan_loss)


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_inf_gradient_with_finite_loss_is_skipped(tmp_path):
    model = make_model()
    engine = engine_for(model, tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def inf_grad_loss(model, batch):
        logits = InfGrad.apply(model(batch["tokens"]))
        labels = batch["labels"]
        loss_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        return loss_sum, (labels != -100).sum()

    r = engine.train_step([make_rows(0, 2)], inf_grad_loss)
    assert r.skipped and torch.isfinite(torch.tensor(r.loss)) and not torch.isfinite(torch.tensor(r.grad_norm))
    assert engine.step == 0 and engine.skipped_total == 1
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_bf16_runs_on_cpu_with_fp32_master_weights_and_grads(tmp_path):
    model = make_model()
    engine = engine_for(model, tmp_path, precision="bf16")
    seen = {}

    def loss_fn(model, batch):
        logits = model(batch["tokens"])
        seen["dtype"] = logits.dtype
        loss_sum, n = lm_loss(model, batch)
        return loss_sum, n

    losses = [engine.train_step(split(make_rows(s % 2, 4), 2), loss_fn).loss for s in range(6)]
    assert seen["dtype"] == torch.bfloat16  # bf16 compute
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert losses[-1] < losses[0]


def test_activation_checkpointing_gives_the_same_update(tmp_path):
    weights = []
    for ckpt in (False, True):
        model = make_model(frozen=("embed", "blocks.0"))
        engine = engine_for(model, tmp_path / str(ckpt), activation_checkpointing=ckpt)
        if ckpt:
            assert "checkpointed 3 blocks" in engine.backend.checkpointing
        for s in range(2):
            engine.train_step(split(make_rows(s, 4), 2), lm_loss)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-6, rtol=0)


def test_activation_checkpointing_without_hook_is_a_clear_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TrainingError, match="gradient_checkpointing_enable"):
        engine_for(model, tmp_path, activation_checkpointing=True)


def test_model_without_trainable_params_is_an_error(tmp_path):
    model = make_model(frozen=("",))
    with pytest.raises(TrainingError, match="no parameter with requires_grad"):
        engine_for(model, tmp_path)


def test_compile_keeps_parameter_names(tmp_path, monkeypatch):
    """engine.compile wraps the model; weights keep the model's names. (aot_eager: the plumbing without
    inductor's C++ build, which takes ~40 s on CPU; inductor was checked by hand.)"""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = make_model(frozen=("embed",))
    engine = engine_for(model, tmp_path, compile=True)
    assert engine.model is not model and engine.module is model
    losses = [engine.train_step([make_rows(s, 4)], lm_loss).loss for s in range(3)]
    assert losses[-1] < losses[0]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(engine.trainable_state_dict()) == names
    folder = engine.save_checkpoint({})
    other = engine_for(make_model(frozen=("embed",)), tmp_path)
    assert other.resume(folder) == {} and other.step == 3
