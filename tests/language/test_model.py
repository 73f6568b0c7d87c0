"""The Llama model itself: preset sizes, masks, KV cache and padding behave as specified."""
import pytest
import torch

from language import Llama, LlamaConfig, preset
from language.attention import AttentionMask


@pytest.mark.parametrize("name,billions", [("llama3-8b", 8.03), ("llama3-70b", 70.6), ("llama3-405b", 405.9)])
def test_paper_presets_parameter_counts(name, billions):
    with torch.device("meta"):
        model = Llama(preset(name))
    assert round(model.num_parameters() / 1e9, 2 if billions < 10 else 1) == billions


def test_llama32_presets_tie_embeddings():
    with torch.device("meta"):
        model = Llama(preset("llama3.2-1b"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 1.2e9 < model.num_parameters() < 1.3e9


def test_unknown_preset_names_the_closest():
    with pytest.raises(ValueError, match="did you mean 'llama3-8b'"):
        preset("llama3-8B")


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Llama(preset("tiny", vocab_size=97, n_layers=2)).eval()


def test_document_mask_equals_separate_documents(tiny):
    docs = [torch.randint(0, 97, (n,)) for n in (5, 9, 3)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        out = tiny(packed, doc_ids=doc_ids, positions=positions)
        alone = torch.cat([tiny(d[None])[0] for d in docs])
    torch.testing.assert_close(out[0], alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # without the mask, later documents do see earlier ones
        leaky = tiny(packed, positions=positions)
    assert (leaky[0, 5:] - alone[5:]).abs().max() > 1e-3


def test_kv_cache_decoding_equals_full_forward(tiny):
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = tiny(tokens)
        cache = tiny.new_cache(2, 32)
        steps = [tiny(tokens[:, :7], cache=cache)]
        steps += [tiny(tokens[:, t:t + 1], cache=cache) for t in range(7, 10)]
        steps.append(tiny(tokens[:, 10:], cache=cache))  # a chunk of 2 after the cache filled
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12


def test_left_padding_equals_unpadded(tiny):
    short, long = torch.randint(0, 97, (4,)), torch.randint(0, 97, (7,))
    batch = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    mask = torch.tensor([[False] * 3 + [True] * 4, [True] * 7])
    with torch.no_grad():
        cache = tiny.new_cache(2, 16)
        out = tiny(batch, attention_mask=mask, cache=cache)
        nxt = torch.randint(0, 97, (2, 1))
        step = tiny(nxt, cache=cache)
        ref_short = tiny(torch.cat([short, nxt[0]])[None])
        ref_long = tiny(torch.cat([long, nxt[1]])[None])
    torch.testing.assert_close(out[0, 3:], ref_short[0, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], ref_short[0, 4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_long[0, 7], atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error(tiny):
    cache = tiny.new_cache(1, 4)
    with pytest.raises(ValueError, match="exceed the cache"):
        tiny(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_gradient_checkpointing_gives_same_gradients(tiny):
    tokens = torch.randint(0, 97, (2, 10))
    tiny.train()
    tiny(tokens).sum().backward()
    ref = [p.grad.clone() for p in tiny.parameters()]
    tiny.zero_grad()
    tiny.gradient_checkpointing_enable()
    tiny(tokens).sum().backward()
    for a, b in zip(ref, (p.grad for p in tiny.parameters())):
        torch.testing.assert_close(a, b)


def test_plain_causal_needs_no_mask_tensor():
    mask = AttentionMask.build(8, 0, None, None, torch.device("cpu"))
    assert mask.is_causal and mask.dense is None


def test_flex_attention_document_mask_equals_dense(tiny):
    """The block-mask path used on GPU for long packed sequences (compiled on CPU here)."""
    tokens = torch.randint(0, 97, (2, 256))
    doc_ids = (torch.arange(256) >= 100).long().expand(2, 256)
    positions = torch.where(doc_ids == 0, torch.arange(256), torch.arange(256) - 100)
    with torch.no_grad():
        dense = tiny(tokens, doc_ids=doc_ids, positions=positions)
        tiny.model.use_flex_attention = True
        flex = tiny(tokens, doc_ids=doc_ids, positions=positions)
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)


def test_dtype_casts_keep_rope_frequencies_float32(tiny):
    expected = tiny.model.fresh_inv_freq()
    tiny.to(torch.bfloat16)
    assert tiny.model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(tiny.model.inv_freq, expected, rtol=0, atol=0)


def test_logits_to_keep_returns_the_last_positions(tiny):
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(tiny(tokens, logits_to_keep=2), tiny(tokens)[:, -2:])
