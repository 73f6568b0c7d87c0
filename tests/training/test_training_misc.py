"""Small helpers: launcher arguments, RNG state round trip, batch placement."""

import io
import os
import random

import numpy as np
import torch

from training.distributed import strip_local_rank_arg
from training.precision import move_batch
from training.rng import get_rng_state, set_rng_state


def test_strip_local_rank_arg(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank_arg(["run", "--local_rank=1", "exp.yaml", "model.lr=3e-4"]) == \
        ["run", "exp.yaml", "model.lr=3e-4"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank_arg(["--local_rank", "1", "run"]) == ["run"]


def test_rng_state_round_trips_through_weights_only_load():
    state = get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2])


def test_move_batch_keeps_structure_and_int_dtypes():
    batch = {"tokens": torch.ones(2, 3, dtype=torch.long), "audio": [torch.zeros(2)], "meta": "x",
             "pair": (torch.ones(1), 3)}
    moved = move_batch(batch, torch.device("cpu"), float_dtype=torch.bfloat16)
    assert moved["tokens"].dtype == torch.long and moved["audio"][0].dtype == torch.bfloat16
    assert moved["meta"] == "x" and isinstance(moved["pair"], tuple) and moved["pair"][1] == 3
