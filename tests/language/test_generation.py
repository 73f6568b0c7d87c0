"""Generation: greedy equals Hugging Face, left-padded batches equal single prompts, the cached path
equals full forwards, stop ids, nucleus sampling and seeding, context-length errors."""
import pytest
import torch

from language import Llama, preset
from language import generation
from language.checkpoints.hf import config_to_hf
from language.generation import generate, sample_next

transformers = pytest.importorskip("transformers")


def hf_llama(config):
    """A `transformers.LlamaForCausalLM` of the same shape as our `config` (random weights)."""
    hf_config = transformers.LlamaConfig(**config_to_hf(config, torch.float32), bos_token_id=None,
                                         eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(hf_config).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Llama(preset("tiny", vocab_size=97, max_seq_len=64)).eval()


def prompts_of(lengths, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["tiny", "tiny-scaled", "tiny-lm"])
def test_greedy_equals_hf_generate(name):
    torch.manual_seed(0)
    config = preset(name)
    hf = hf_llama(config)
    ours = Llama(config).eval()
    ours.load_state_dict(hf.state_dict())
    prompt = prompts_of([11], vocab=config.vocab_size)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                               min_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert generate(ours, [prompt], max_new_tokens=24) == [expected]


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny):
    prompts = prompts_of([3, 9, 6, 9])
    alone = [generate(tiny, [p], max_new_tokens=12)[0] for p in prompts]
    for pad_id in (0, 42):  # padding is masked out: its id does not matter
        assert generate(tiny, prompts, max_new_tokens=12, pad_id=pad_id) == alone


def test_cached_step_logits_equal_full_forward(tiny, monkeypatch):
    seen = []  # next-token logits (B, vocab) in the order generate samples them
    real_sample = generation.sample_next

    def recording_sample(logits, *args):
        seen.append(logits.clone())
        return real_sample(logits, *args)
    monkeypatch.setattr(generation, "sample_next", recording_sample)
    prompts = prompts_of([4, 10, 7], seed=2)
    outputs = generate(tiny, prompts, max_new_tokens=6)
    assert len(seen) == 6
    with torch.no_grad():
        for row, (prompt, new) in enumerate(zip(prompts, outputs)):
            full = tiny(torch.tensor([prompt + new]))[0]  # (T, vocab), no cache, no padding
            for step in range(6):
                torch.testing.assert_close(seen[step][row], full[len(prompt) - 1 + step], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overlap", [False, True], ids=["read-then-launch", "launch-then-read (CUDA order)"])
def test_stop_ids_end_each_row_and_are_not_returned(tiny, monkeypatch, overlap):
    monkeypatch.setattr(generation, "overlap_steps", lambda device: overlap)
    prompts = prompts_of([5, 8, 3], seed=3)
    free = generate(tiny, prompts, max_new_tokens=16)
    stop = next(t for t in free[0][2:] if t not in free[0][:2])  # a token row 0 produces, not first
    streamed = [[] for _ in prompts]
    stopped = generate(tiny, prompts, max_new_tokens=16, stop_ids=[stop],
                       on_token=lambda row, tok: streamed[row].append(tok))
    for row, tokens in enumerate(free):
        cut = tokens.index(stop) if stop in tokens else len(tokens)
        assert stopped[row] == tokens[:cut]
    assert len(stopped[0]) < len(free[0])
    assert streamed == stopped


def test_tiny_top_p_equals_greedy(tiny):
    prompts = prompts_of([6, 4], seed=4)
    greedy = generate(tiny, prompts, max_new_tokens=10)
    assert generate(tiny, prompts, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=0) == greedy


def test_seeded_sampling_is_reproducible(tiny):
    prompts = prompts_of([6, 4], seed=5)
    first = generate(tiny, prompts, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=123)
    assert generate(tiny, prompts, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=123) == first
    assert generate(tiny, prompts, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=124) != first
    assert first != generate(tiny, prompts, max_new_tokens=20)  # it does sample


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, 0.7, g), minlength=4).float() / 20000
    assert counts[0] == 0 and counts[2] == 0  # 0.5 + 0.3 reach 0.7; the rest is cut
    torch.testing.assert_close(counts[[1, 3]], torch.tensor([0.625, 0.375]), atol=0.02, rtol=0)
    counts = torch.bincount(sample_next(logits, 1.0, 0.85, g), minlength=4).float() / 20000
    assert counts[0] == 0 and counts[2] > 0.1  # 0.8 < 0.85: the third token joins


def test_too_long_prompt_names_both_lengths(tiny):
    with pytest.raises(ValueError, match=r"prompt of 60 tokens \+ max_new_tokens 10 = 70 .* context of 64"):
        generate(tiny, prompts_of([60, 3]), max_new_tokens=10)
    assert len(generate(tiny, prompts_of([60]), max_new_tokens=4)[0]) == 4  # exactly at the limit is fine


def test_bad_arguments_and_mode(tiny):
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, [[1, 2]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, [[1, 2], []], max_new_tokens=2)
    assert generate(tiny, [[1], [2, 3]], max_new_tokens=0) == [[], []]
    tiny.train()
    generate(tiny, [[1, 2]], max_new_tokens=2)
    assert tiny.training  # restored
    tiny.eval()
