"""K samples per prompt: one prefill per prompt batch (the KV cache is shared by the K samples), greedy
samples equal `generate`, seeded sampling is reproducible and actually varies."""
import pytest
import torch

from language import Llama, preset
from language.generation import generate
from language.sampling import sample_k


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(preset("tiny", vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                        rope_theta=1000.0, max_seq_len=64)).eval()


PROMPTS = [[1, 5, 9, 3], [7, 2], [4, 4, 4, 4, 4, 8]]  # different lengths: left padding


def test_greedy_samples_equal_generate_and_prefill_runs_once(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(tuple(args[0].shape)),
                                             with_kwargs=True)
    try:
        samples = sample_k(model, PROMPTS, k=3, max_new_tokens=6, temperature=0.0, stop_ids={0})
    finally:
        handle.remove()
    prefills = [shape for shape in calls if shape[1] > 1]
    assert prefills == [(3, 6)]  # the B prompts once, not B*K rows
    assert all(shape == (9, 1) for shape in calls[1:])  # then B*K rows, one token per step
    expected = generate(model, PROMPTS, max_new_tokens=6, stop_ids={0})
    for row, exp in zip(samples, expected):
        assert len(row) == 3
        for s in row:
            assert s.ids == exp
            assert s.stopped == (len(exp) < 6)


def test_seeded_sampling_is_reproducible_and_varies(model):
    kwargs = dict(k=8, max_new_tokens=5, temperature=1.5, seed=123)
    a = sample_k(model, PROMPTS, **kwargs)
    b = sample_k(model, PROMPTS, **kwargs)
    assert [[s.ids for s in row] for row in a] == [[s.ids for s in row] for row in b]
    assert all(len({tuple(s.ids) for s in row}) > 1 for row in a)


def test_stop_ids_end_a_sample(model):
    first = generate(model, [PROMPTS[0]], max_new_tokens=1)[0][0]
    (row,) = sample_k(model, [PROMPTS[0]], k=2, max_new_tokens=5, temperature=0.0, stop_ids={first})
    assert all(s.ids == [] and s.stopped for s in row)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="k must be >= 1"):
        sample_k(model, PROMPTS, k=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sample_k(model, PROMPTS, k=2, max_new_tokens=60)
