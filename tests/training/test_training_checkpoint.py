"""Checkpoint layout, atomicity, verification, keep-last, and exact resume (torch backend, CPU)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from training import CheckpointError, Engine, EngineConfig, OptimConfig, ScheduleConfig
from training import checkpoint as ckpt

from training_tiny import lm_loss, make_model, make_rows, split

SCHED = ScheduleConfig(warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
TOTAL = 8


def new_engine(run_dir, frozen=("embed",), **cfg):
    model = make_model(seed=1, frozen=frozen, dropout=0.2)
    return Engine(model, EngineConfig(**cfg), OptimConfig(lr=1e-2), SCHED, TOTAL, run_dir, seed=3)


def train(engine, first, last):
    """Steps first..last-1 with step-indexed data; returns the losses."""
    return [engine.train_step(split(make_rows(s, 4), 2), lm_loss).loss for s in range(first, last)]


def test_exact_resume_matches_an_uninterrupted_run(tmp_path):
    full = new_engine(tmp_path / "full")
    full_losses = train(full, 0, TOTAL)

    a = new_engine(tmp_path / "split")
    first = train(a, 0, TOTAL // 2)
    a.save_checkpoint({"next_step": TOTAL // 2})
    train(a, TOTAL // 2, TOTAL // 2 + 1)  # this run goes on a bit (moves RNG, weights) and then "crashes"

    b = new_engine(tmp_path / "split")
    extra = b.resume(ckpt.latest_complete(tmp_path / "split"))
    assert extra == {"next_step": TOTAL // 2} and b.step == TOTAL // 2
    second = train(b, extra["next_step"], TOTAL)
    assert first + second == pytest.approx(full_losses, abs=1e-6, rel=0)
    for (n, p), (_, q) in zip(full.module.named_parameters(), b.module.named_parameters()):
        assert torch.equal(p, q), n
    assert b.lr == full.lr


def test_layout_and_weights_only_files(tmp_path):
    engine = new_engine(tmp_path, frozen=("embed", "blocks.0"))
    train(engine, 0, 2)
    folder = engine.save_checkpoint({"data": {"epoch": 0, "index": 8}, "base": "/models/base.safetensors"})
    assert folder == tmp_path / "checkpoints" / "step_00000002"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt", "state.json"]
    weights = load_file(str(folder / "model.safetensors"))
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    assert set(weights) == trainable and not any(n.startswith(("embed", "blocks.0.")) for n in weights)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(folder / name, weights_only=True)
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 2 and state["extra_state"]["data"]["index"] == 8
    assert set(state["manifest"]) == set(names) - {"state.json"}
    assert state["manifest"]["model.safetensors"]["bytes"] == (folder / "model.safetensors").stat().st_size


def test_truncated_file_names_file_and_sizes(tmp_path):
    engine = new_engine(tmp_path)
    train(engine, 0, 1)
    folder = engine.save_checkpoint({})
    path = folder / "optimizer.pt"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    expected = rf"optimizer\.pt: size mismatch, expected {size} bytes, found {size - 10}"
    with pytest.raises(CheckpointError, match=expected):
        new_engine(tmp_path).resume()


def test_corrupted_bytes_fail_the_sha256(tmp_path):
    engine = new_engine(tmp_path)
    train(engine, 0, 1)
    folder = engine.save_checkpoint({})
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        new_engine(tmp_path).resume()


def test_mismatching_model_lists_names_and_shapes(tmp_path):
    engine = new_engine(tmp_path)
    train(engine, 0, 1)
    engine.save_checkpoint({})
    other = Engine(make_model(seed=1, dim=8), EngineConfig(), OptimConfig(), SCHED, TOTAL, tmp_path)
    expected = (r"missing from the checkpoint, e\.g\. \['embed\.weight'\]; 21 shape mismatches, "
                r"e\.g\. \['blocks\.0\.norm\.weight: checkpoint \[16\] vs model \[8\]'")
    with pytest.raises(CheckpointError, match=expected):
        other.resume()
    # a different frozen/trainable split: names missing / unexpected
    refrozen = new_engine(tmp_path, frozen=("embed", "head"))
    with pytest.raises(CheckpointError, match=r"not trainable in the model, e\.g\. \['head\.bias', 'head\.weight'\]"):
        refrozen.resume()


def test_no_checkpoint_gives_none(tmp_path):
    assert new_engine(tmp_path).resume() is None


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    engine = new_engine(tmp_path)
    train(engine, 0, 1)
    good = engine.save_checkpoint({"n": 1})
    train(engine, 1, 2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "publish", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint({"n": 2})
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if ".tmp-" in p.name]
    assert leftovers == [f"step_00000002.tmp-{os.getpid()}"]
    assert ckpt.latest_complete(tmp_path) == good
    assert new_engine(tmp_path).resume() == {"n": 1}
    # the next save cleans the half-written folder up
    engine.save_checkpoint({"n": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]


def test_keep_last(tmp_path):
    engine = new_engine(tmp_path, keep_last=2)
    for s in range(4):
        train(engine, s, s + 1)
        engine.save_checkpoint({"s": s})
    assert [step for step, _ in ckpt.list_complete(tmp_path)] == [3, 4]


def test_extra_state_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        new_engine(tmp_path).save_checkpoint({"t": torch.zeros(1)})
