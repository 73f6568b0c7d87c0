"""The gated cross-attention block: identity when fresh, exact zero for rows that see no image, GQA maths,
cached keys/values, and where blocks sit between the LM layers."""
import pytest
import torch
import torch.nn.functional as F

from adapters.cross_attention import (CrossAttentionMask, GatedCrossAttentionBlock, default_positions,
                                      positions_from_mllama, positions_to_mllama)

DIM, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 4, 2, 8, 48
TILES, PER_TILE = 2, 5  # per image


def block(**kw):
    torch.manual_seed(0)
    b = GatedCrossAttentionBlock(DIM, HEADS, KV_HEADS, HEAD_DIM, FFN, **kw)
    b.reset_parameters()
    return b


def opened(b, attn=0.7, mlp=-0.4):
    with torch.no_grad():
        b.cross_attn_attn_gate.fill_(attn)
        b.cross_attn_mlp_gate.fill_(mlp)
        for norm in (b.input_layernorm, b.post_attention_layernorm, b.cross_attn.q_norm, b.cross_attn.k_norm):
            norm.weight.uniform_(0.5, 1.5)
    return b


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 6, DIM, generator=g)
    images = torch.randn(2, 2 * TILES * PER_TILE, DIM, generator=g)  # 2 images per sample
    mask = torch.zeros(2, 6, 2, TILES, dtype=torch.long)
    mask[0, 2:, 0, :] = 1  # sample 0: tokens 0-1 are text before the first image
    mask[0, 4:, 1, :1] = 1  # second image, one real tile
    # sample 1 sees no image at all (a text-only sample in an image batch)
    return h, images, mask


def reference(b, h, images, mask):
    """Meta's reference semantics written out: repeat KV heads, masked softmax, zero rows that see nothing."""
    xa = b.cross_attn
    bsz, t, _ = h.shape
    x = b.input_layernorm(h)
    q = xa.q_norm(xa.q_proj(x).view(bsz, t, HEADS, HEAD_DIM)).transpose(1, 2)
    k = xa.k_norm(xa.k_proj(images).view(bsz, -1, KV_HEADS, HEAD_DIM)).transpose(1, 2)
    v = xa.v_proj(images).view(bsz, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    visible = mask.repeat_interleave(PER_TILE, dim=3).flatten(2).bool()  # (B, T, S)
    scores = (q @ k.transpose(-1, -2)) / HEAD_DIM ** 0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, -1))  # all-masked rows -> 0
    attn = xa.o_proj((probs @ v).transpose(1, 2).reshape(bsz, t, -1))
    row = visible.any(-1, keepdim=True)
    h = h + b.cross_attn_attn_gate.tanh() * attn * row
    return h + b.cross_attn_mlp_gate.tanh() * b.mlp(b.post_attention_layernorm(h)) * row


def test_fresh_block_is_exactly_the_identity():
    b = block()
    h, images, mask = inputs()
    out = b(h, b.project_kv(images), CrossAttentionMask.build(mask, PER_TILE))
    assert torch.equal(out, h)


def test_open_gates_match_the_reference_and_rows_without_images_are_exactly_unchanged():
    b = opened(block())
    h, images, mask = inputs()
    out = b(h, b.project_kv(images), CrossAttentionMask.build(mask, PER_TILE))
    torch.testing.assert_close(out, reference(b, h, images, mask), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, :2], h[0, :2])  # text before the first image: attention AND MLP give exactly 0
    assert torch.equal(out[1], h[1])  # a sample that sees no image
    assert (out[0, 2:] - h[0, 2:]).abs().amin(-1).gt(0).all()  # the others do change


def test_transformers_empty_rows_reproduces_the_leak():
    b = opened(block(transformers_empty_rows=True))
    h, images, mask = inputs()
    out = b(h, b.project_kv(images), CrossAttentionMask.build(mask, PER_TILE))
    assert not torch.equal(out[0, :2], h[0, :2]) and not torch.equal(out[1], h[1])
    # what leaks is attention over every image token, uniformly unmasked; the MLP stays masked
    xa = b.cross_attn
    x = b.input_layernorm(h[1:])
    q = xa.q_norm(xa.q_proj(x).view(1, 6, HEADS, HEAD_DIM)).transpose(1, 2)
    kv = b.project_kv(images[1:])
    attn = F.scaled_dot_product_attention(q, kv.keys, kv.values, enable_gqa=True)
    leaked = h[1:] + b.cross_attn_attn_gate.tanh() * xa.o_proj(attn.transpose(1, 2).reshape(1, 6, -1))
    torch.testing.assert_close(out[1:], leaked, atol=1e-6, rtol=1e-6)


def test_cached_keys_serve_one_token_at_a_time():
    b = opened(block())
    h, images, mask = inputs()
    kv = b.project_kv(images)
    full_mask = CrossAttentionMask.build(mask, PER_TILE)
    full = b(h, kv, full_mask)
    steps = torch.cat([b(h[:, t:t + 1], kv, full_mask.rows(t, t + 1)) for t in range(h.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-6, rtol=1e-6)


def test_gradients_reach_every_adapter_parameter_but_not_through_masked_rows():
    b = opened(block())
    h, images, mask = inputs()
    h.requires_grad_(True)
    out = b(h, b.project_kv(images), CrossAttentionMask.build(mask, PER_TILE))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters())
    assert torch.equal(h.grad[1], torch.ones_like(h.grad[1]))  # identity for the sample that sees nothing


def test_mask_marks_padded_tiles_and_empty_rows():
    mask = torch.zeros(1, 3, 1, 2, dtype=torch.long)
    mask[0, 1:, 0, 0] = 1
    m = CrossAttentionMask.build(mask, tokens_per_tile=3)
    assert m.keys.shape == (1, 1, 3, 6) and m.row_visible[0, :, 0].tolist() == [False, True, True]
    assert m.keys[0, 0, 0].all()  # an empty row attends everywhere (its output is dropped), never NaN
    assert m.keys[0, 0, 1].tolist() == [True] * 3 + [False] * 3
    with pytest.raises(ValueError, match="must be"):
        CrossAttentionMask.build(mask[0], 3)


def test_positions():
    assert default_positions(32, 4) == [3, 7, 11, 15, 19, 23, 27, 31]  # Llama 3.2 Vision's fusion schedule
    assert positions_to_mllama(default_positions(32, 4)) == [3, 8, 13, 18, 23, 28, 33, 38]  # Mllama-11B
    assert positions_from_mllama([3, 8, 13, 18, 23, 28, 33, 38], 40) == default_positions(32, 4)
    assert default_positions(30, 4) == [5, 9, 13, 17, 21, 25, 29]
    assert default_positions(2, 4) == [1]
    assert positions_from_mllama([0, 1, 5], 6) == [0, 0, 3]  # two blocks before the first LM layer
    with pytest.raises(ValueError, match="distinct indices"):
        positions_from_mllama([1, 1], 4)
    with pytest.raises(ValueError, match="distinct indices"):
        positions_from_mllama([4], 4)
