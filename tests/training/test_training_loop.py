"""training.loop: sharding a step's rows across ranks and micro-batches, cadence, stop + resume, workers."""
import json

import pytest
import torch

from training import Engine, EngineConfig, MetricsLogger, OptimConfig, ScheduleConfig, TrainingError
from training.loop import Cadence, fit, shard

from training_tiny import lm_loss, make_model, make_rows

ROWS_PER_STEP = 8


class RowsTask:
    """Step s = rows 0..7 of make_rows(s, 8) (as (step, row) pairs); records what it collated."""

    def __init__(self):
        self.collated: list[list[tuple[int, int]]] = []
        self.evaluated: list[int] = []

    def rows(self, step):
        return [(step, i) for i in range(ROWS_PER_STEP)]

    def collate(self, rows):
        self.collated.append(list(rows))
        step = rows[0][0]
        full = make_rows(step, ROWS_PER_STEP)
        index = torch.tensor([i for _, i in rows])
        return {k: v[index] for k, v in full.items()}

    def loss(self, model, batch):
        return lm_loss(model, batch)

    def evaluate(self, step):
        self.evaluated.append(step)
        return {"eval_marker": float(step)}


def test_shard_gives_disjoint_rows_whose_union_is_the_step():
    rows = list(range(12))
    parts = [shard(rows, rank, 2, 3) for rank in range(2)]
    flat = [x for rank_parts in parts for part in rank_parts for x in part]
    assert sorted(flat) == rows and len(flat) == len(set(flat))
    assert [len(p) for p in parts[0]] == [2, 2, 2]
    # one rank with accumulation 2 sees the micro-batches that 2 ranks without accumulation see
    assert shard(rows, 0, 1, 2) == [shard(rows, 0, 2, 1)[0], shard(rows, 1, 2, 1)[0]]
    with pytest.raises(TrainingError, match="grad_accum_steps"):
        shard(rows, 0, 4, 4)


def _engine(tmp_path, accum=1):
    return Engine(make_model(), EngineConfig(grad_accum_steps=accum), OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=1),
                  6, tmp_path)


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fit_trains_every_row_once_evaluates_checkpoints_and_resumes_exactly(tmp_path):
    task = RowsTask()
    with _engine(tmp_path / "full", accum=2) as engine:
        result = fit(engine, task, Cadence(6, checkpoint_every=4, eval_every=2), {"step": 0},
                     MetricsLogger(tmp_path / "full"))
    assert result.state["step"] == 6 and not result.stopped and engine.step == 6
    assert len(task.collated) == 12 and all(len(part) == 4 for part in task.collated)
    assert sorted(task.collated[0] + task.collated[1]) == task.rows(0)
    assert task.evaluated == [2, 4]  # the last step is left to the recipe's final evaluation
    full = _losses(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6] and full[1]["eval_marker"] == 2.0
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()
                  if p.name.startswith("step_")) == ["step_00000004", "step_00000006"]

    with _engine(tmp_path / "part", accum=2) as engine:
        stopped = fit(engine, RowsTask(), Cadence(6, checkpoint_every=100, stop_after_steps=3), {"step": 0},
                      MetricsLogger(tmp_path / "part"))
    assert stopped.stopped and stopped.state["step"] == 3
    with _engine(tmp_path / "part", accum=2) as engine:
        state = engine.resume()
        assert state == {"step": 3}
        fit(engine, RowsTask(), Cadence(6), state, MetricsLogger(tmp_path / "part"))
    # equal to rounding: the same computation after optimizer state round-trips through a checkpoint file
    assert [r["loss"] for r in _losses(tmp_path / "part")] == pytest.approx([r["loss"] for r in full], abs=1e-6)


def test_workers_prepare_the_same_batches(tmp_path):
    with _engine(tmp_path / "a") as engine:
        fit(engine, RowsTask(), Cadence(3), {"step": 0}, MetricsLogger(tmp_path / "a"))
    with _engine(tmp_path / "b") as engine:
        fit(engine, RowsTask(), Cadence(3), {"step": 0}, MetricsLogger(tmp_path / "b"), workers=2)
    assert [r["loss"] for r in _losses(tmp_path / "a")] == [r["loss"] for r in _losses(tmp_path / "b")]


class UntilTask(RowsTask):
    """Runs until 5 steps are done; steps 2 and 3 hold the LR schedule (as text pre-training's NIAH retries)."""

    def done(self, state):
        return state["step"] >= 5

    def schedule_advances(self, step):
        return step not in (2, 3)

    def after_step(self, step, result, state):
        return {"held": step - 1 in (2, 3)}


def test_a_task_with_done_runs_until_it_says_so_and_can_hold_the_schedule(tmp_path):
    with _engine(tmp_path) as engine:
        result = fit(engine, UntilTask(), Cadence(3), {"step": 0}, MetricsLogger(tmp_path))
    records = _losses(tmp_path)
    assert result.state["step"] == 5 and len(records) == 5  # past Cadence.steps: done() decides
    lrs = [r["lr"] for r in records]
    assert [r["held"] for r in records] == [False, False, True, True, False]
    assert lrs[2] == lrs[3] == lrs[4] != lrs[1]  # held steps leave the schedule where it was: step 4 starts there
    with _engine(tmp_path / "w") as engine, pytest.raises(TrainingError, match="workers=0"):
        fit(engine, UntilTask(), Cadence(3), {"step": 0}, MetricsLogger(tmp_path / "w"), workers=2)


def test_state_from_before_the_loop_continues_where_it_was(tmp_path):
    """Checkpoints written before the loop kept the data position as "position" (or only the engine's step)."""
    task = RowsTask()
    with _engine(tmp_path) as engine:
        result = fit(engine, task, Cadence(4), {"position": 3}, MetricsLogger(tmp_path))
    assert result.state == {"step": 4} and task.collated == [task.rows(3)]
