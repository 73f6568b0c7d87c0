"""DeepSpeed backend on CPU (gloo): ZeRO-2/3 with frozen parameters, exact token weighting, bf16, skips,
ZeRO-3 checkpoint resume, and a 2-process run through the deepspeed launcher."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from training import Engine, EngineConfig, OptimConfig, ScheduleConfig  # noqa: E402
from training.distributed import find_free_port  # noqa: E402

from training_tiny import (GRAD_NORM_RTOL, LOSS_ATOL, WEIGHT_ATOL, lm_loss, make_model, make_rows,  # noqa: E402
                           partition_everything_under_zero3, split)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCHED = ScheduleConfig(warmup_steps=1, decay="cosine", min_lr_ratio=0.1)
OPTIM = OptimConfig(lr=1e-2, grad_clip=0.5)
FROZEN = ("embed", "blocks.0")
TOTAL = 6


@pytest.fixture(autouse=True)
def _partition_tiny_params(monkeypatch):
    """ZeRO-3 tests partition every parameter, as they would be in a real model."""
    from training import backend_deepspeed

    monkeypatch.setattr(backend_deepspeed, "deepspeed_config", backend_deepspeed.deepspeed_config)
    partition_everything_under_zero3(backend_deepspeed)


def run_steps(engine, first, last, n_rows=4, n_micro=2):
    return [engine.train_step(split(make_rows(s, n_rows), n_micro), lm_loss) for s in range(first, last)]


def unequal_micro_batches(step):
    """Three micro-batches of 1, 2 and 3 rows (different token counts)."""
    rows = make_rows(step, 6)
    return [{k: v[a:b] for k, v in rows.items()} for a, b in ((0, 1), (1, 3), (3, 6))]


def frozen_values(engine):
    """Full values of the frozen parameters (gathered under ZeRO-3)."""
    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                out[name] = p.detach().clone()
    return out


def optimizer_numel(engine):
    """Elements with Adam state: fp32 master partitions of the ZeRO optimizer, or the torch AdamW's state."""
    opt = engine.backend.engine.optimizer
    if isinstance(opt, torch.optim.AdamW):  # stage 0
        return sum(p.numel() for p in opt.state)
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups")
    return sum(t.numel() for t in flats)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_trains_frozen_stays_and_matches_torch(tmp_path, stage):
    """ZeRO-0/2/3 (3: + activation checkpointing) with frozen params equals the torch backend (fp32)."""
    ref = Engine(make_model(frozen=FROZEN), EngineConfig(), OPTIM, SCHED, TOTAL, tmp_path / "torch")
    ref_results = [ref.train_step(unequal_micro_batches(s), lm_loss) for s in range(4)]

    model = make_model(frozen=FROZEN)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = EngineConfig(backend="deepspeed", zero_stage=stage, activation_checkpointing=stage == 3, grad_accum_steps=3)
    with Engine(model, cfg, OPTIM, SCHED, TOTAL, tmp_path / "ds") as engine:
        results = [engine.train_step(unequal_micro_batches(s), lm_loss) for s in range(4)]
        assert engine.step == 4
        assert results[-1].loss < results[0].loss
        for r, q in zip(results, ref_results):
            assert r.tokens == q.tokens and r.lr == pytest.approx(q.lr)
            assert r.loss == pytest.approx(q.loss, abs=LOSS_ATOL)  # other accumulation order: see training_tiny
            assert r.grad_norm == pytest.approx(q.grad_norm, rel=GRAD_NORM_RTOL)  # DeepSpeed's own norm
        weights = engine.trainable_state_dict()
        for name, p in ref.module.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(weights[name], p.detach(), atol=WEIGHT_ATOL, rtol=0)
        assert set(weights) == {n for n, p in ref.module.named_parameters() if p.requires_grad}
        for name, value in frozen_values(engine).items():
            assert torch.equal(value, frozen_before[name]), f"frozen {name} changed"
        padding = 64 if stage == 3 else 0
        assert n_trainable <= optimizer_numel(engine) <= n_trainable + padding  # no state for frozen params

        def nan_loss(model, batch):
            loss_sum, n = lm_loss(model, batch)
            return loss_sum * float("nan"), n

        r = engine.train_step(unequal_micro_batches(7), nan_loss)
        assert r.skipped and engine.step == 4 and engine.skipped_total == 1
        after = engine.trainable_state_dict()
        assert all(torch.equal(after[k], weights[k]) for k in weights)


def test_bf16_zero1_trains_and_skips_nonfinite_steps(tmp_path):
    """bf16 + ZeRO-1 (DeepSpeed's BF16_Optimizer, fp32 grad accumulation) trains; a NaN step is dropped."""
    cfg = EngineConfig(backend="deepspeed", zero_stage=1, precision="bf16", grad_accum_steps=2)
    with Engine(make_model(frozen=FROZEN), cfg, OPTIM, SCHED, TOTAL, tmp_path) as engine:
        losses = [engine.train_step(split(make_rows(s % 2, 4), 2), lm_loss).loss for s in range(5)]
        assert losses[-1] < losses[0]
        before = engine.trainable_state_dict()
        lr = engine.lr

        def nan_loss(model, batch):
            loss_sum, n = lm_loss(model, batch)
            return loss_sum * float("nan"), n

        r = engine.train_step(split(make_rows(9, 4), 2), nan_loss)
        assert r.skipped and engine.step == 5 and engine.skipped_total == 1 and engine.lr == lr
        after = engine.trainable_state_dict()
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert not engine.train_step(split(make_rows(0, 4), 2), lm_loss).skipped


def test_zero3_checkpoint_resume_continues_like_an_uninterrupted_run(tmp_path):
    n, cfg = 3, EngineConfig(backend="deepspeed", zero_stage=3, grad_accum_steps=2)

    def new_engine(run_dir):
        return Engine(make_model(seed=1, frozen=FROZEN, dropout=0.2), cfg, OPTIM, SCHED, 2 * n, run_dir, seed=5)

    with new_engine(tmp_path / "full") as full:
        full_losses = [r.loss for r in run_steps(full, 0, 2 * n)]
        full_weights = full.trainable_state_dict()

    with new_engine(tmp_path / "split") as first:
        first_losses = [r.loss for r in run_steps(first, 0, n)]
        folder = first.save_checkpoint({"next": n})
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"model.safetensors", "scheduler.pt", "rng.pt", "state.json"} <= names
    assert "optimizer.pt" not in names and any(x.startswith("deepspeed/ds/") for x in names)

    with new_engine(tmp_path / "split") as second:
        assert second.resume() == {"next": n} and second.step == n
        second_losses = [r.loss for r in run_steps(second, n, 2 * n)]
        weights = second.trainable_state_dict()
    print("ZeRO-3 resume: max |loss diff| =",
          max(abs(a - b) for a, b in zip(first_losses + second_losses, full_losses)),
          " max |weight diff| =", max(float((weights[k] - full_weights[k]).abs().max()) for k in weights))
    assert first_losses + second_losses == pytest.approx(full_losses, abs=1e-6, rel=0)
    for k in weights:
        assert torch.equal(weights[k], full_weights[k]), k


def test_two_processes_through_the_deepspeed_launcher(tmp_path):
    """ZeRO-3 on 2 CPU ranks: both ranks end identical and equal to a 1-process torch run on all the data."""
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not installed next to python"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    port = find_free_port()
    cmd = [launcher, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(HERE / "training_two_ranks.py"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's shm all-reduce buffers (one per rank, ~70 MB of memory each) are gone with the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    assert proc.stdout.count("trained, saved and closed") == 2, proc.stdout[-3000:]  # both ranks ran to the end
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0["losses"] == w1["losses"] and w0["steps"] == 3
    for k in w0["weights"]:
        assert torch.equal(w0["weights"][k], w1["weights"][k]), k

    # the same data on one process: rank r's micro-batches of step s are rows [3r, 3r+3) of make_rows(s, 6)
    ref = Engine(make_model(frozen=FROZEN), EngineConfig(), OPTIM, SCHED, TOTAL, tmp_path / "ref")
    ref_losses = [ref.train_step(split(make_rows(s, 6), 6), lm_loss).loss for s in range(3)]
    assert w0["losses"] == pytest.approx(ref_losses, abs=LOSS_ATOL)  # all-reduce order: see training_tiny
    for name, p in ref.module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(w0["weights"][name], p.detach(), atol=WEIGHT_ATOL, rtol=0)
    assert (tmp_path / "checkpoints" / "step_00000003" / "state.json").is_file()
