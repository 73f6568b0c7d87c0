"""BEST-RQ: span masking, the frozen random-projection quantizer (determinism, save/restore), the
multi-softmax loss and its metrics, and a few training steps that lower the loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from speech.bestrq import (BestRQConfig, BestRQModel, RandomProjectionQuantizer, SpanMasking, sample_span_mask,
                           usage_perplexity)
from speech.conformer import preset
from speech.features import LogMelFrontend, valid_mask


def test_quantizer_is_deterministic_from_its_seed():
    a, b, c = (RandomProjectionQuantizer(seed=s) for s in (7, 7, 8))
    assert a.projection.shape == (16, 320, 16) and a.codebooks.shape == (16, 8192, 16)
    assert torch.equal(a.projection, b.projection) and torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks) and not torch.equal(a.projection, c.projection)
    torch.testing.assert_close(a.codebooks.norm(dim=-1), torch.ones(16, 8192))
    bound = math.sqrt(6 / (320 + 16))  # Xavier uniform
    assert a.projection.abs().max() <= bound and a.projection.abs().max() > 0.9 * bound
    x = torch.randn(2, 25, 320)
    codes = a(x)
    assert codes.shape == (2, 25, 16) and codes.dtype == torch.long
    assert torch.equal(codes, b(x)) and not torch.equal(codes, c(x))


def test_codes_are_the_cosine_nearest_neighbours():
    q = RandomProjectionQuantizer(input_dim=12, code_dim=4, codebook_size=50, n_codebooks=3, seed=1)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))  # argmax ties could flip across CPUs
    for i in range(3):
        projected = x @ q.projection[i]
        cosine = F.cosine_similarity(projected[:, None], q.codebooks[i][None], dim=-1)  # (40, 50)
        assert torch.equal(q(x)[:, i], cosine.argmax(-1))
    assert torch.equal(q(x, chunk_elements=7), q(x))  # chunking over frames changes nothing


def test_quantizer_save_and_restore_exactly(tmp_path):
    q = RandomProjectionQuantizer(input_dim=20, code_dim=6, codebook_size=32, n_codebooks=2, seed=3)
    with torch.no_grad():  # the file, not the seed, must be what comes back
        q.codebooks[1, 5] = F.normalize(torch.randn(6), dim=0)
    q.save(tmp_path / "quantizer.safetensors")
    loaded = RandomProjectionQuantizer.load(tmp_path / "quantizer.safetensors")
    assert (loaded.input_dim, loaded.code_dim, loaded.codebook_size, loaded.n_codebooks, loaded.seed) == (20, 6, 32, 2, 3)
    assert torch.equal(loaded.projection, q.projection) and torch.equal(loaded.codebooks, q.codebooks)
    x = torch.randn(100, 20)
    assert torch.equal(loaded(x), q(x))
    # the state dict carries them too (checkpoints)
    fresh = RandomProjectionQuantizer(input_dim=20, code_dim=6, codebook_size=32, n_codebooks=2, seed=99)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.codebooks, q.codebooks)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        RandomProjectionQuantizer.load(tmp_path / "nothing.safetensors")


def test_quantizer_stays_float32_under_module_casts():
    q = RandomProjectionQuantizer(input_dim=20, code_dim=6, codebook_size=32, n_codebooks=2)
    projection = q.projection.clone()
    q.to(torch.bfloat16)
    assert q.projection.dtype == torch.float32 and torch.equal(q.projection, projection)
    x = torch.randn(10, 20)
    assert torch.equal(q(x.bfloat16()), q(x.bfloat16().float()))


def test_span_mask_statistics_spans_and_lengths():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3000] * 30 + [40, 5])
    mask = sample_span_mask(lengths, 3000, span=32, start_prob=0.025, generator=gen)
    assert not mask[~valid_mask(lengths, 3000)].any()
    fraction = mask[:30].float().mean().item()
    assert abs(fraction - (1 - 0.975 ** 32)) < 0.03
    assert mask.sum(1).min() >= 1  # every utterance has something to predict
    # runs of masked frames are at least one span long unless cut by the utterance end
    row = mask[0].int().tolist()
    runs, start = [], None
    for t, m in enumerate(row + [0]):
        if m and start is None:
            start = t
        if not m and start is not None:
            runs.append((start, t)); start = None
    assert all(end - begin >= 32 or end == 3000 for begin, end in runs)
    again = sample_span_mask(lengths, 3000, 32, 0.025, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, mask)


def test_masking_replacements():
    features, lengths = torch.randn(4, 200, 80), torch.tensor([200, 150, 100, 60])
    masking = SpanMasking(BestRQConfig(), 80)
    masked, mask = masking(features, lengths, torch.Generator().manual_seed(1))
    assert torch.equal(masked[~mask], features[~mask])
    assert abs(masked[mask].std().item() - 0.1) < 0.01
    learned = SpanMasking(BestRQConfig(mask_replacement="learned"), 80)
    masked, mask = learned(features, lengths, torch.Generator().manual_seed(1))
    assert torch.equal(masked[mask], learned.mask_embedding.detach().expand(int(mask.sum()), 80))
    masked.sum().backward()
    assert learned.mask_embedding.grad is not None


def test_usage_perplexity():
    uniform = torch.arange(64).repeat(3)[:, None].expand(-1, 2)
    constant = torch.zeros(50, 2, dtype=torch.long)
    # the entropy sums 64 terms p log p (|H| = log 64 = 4.2): rounding <= 64 * u * 4.2 = 1.6e-5, relative after exp
    torch.testing.assert_close(usage_perplexity(uniform, 64), torch.full((2,), 64.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(usage_perplexity(constant, 64), torch.ones(2))


def _tiny_model(**overrides):
    config = BestRQConfig(codebook_size=64, n_codebooks=4, mask_span=8, mask_start_prob=0.05, **overrides)
    return BestRQModel(preset("tiny"), config)


def _sine_features(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(16000) / 16000
    waves = []
    for _ in range(n):  # a few tones gliding in frequency, with a little noise
        f0 = 200 + 600 * torch.rand(1, generator=gen)
        glide = 300 * torch.rand(1, generator=gen)
        phase = 2 * math.pi * torch.cumsum(f0 + glide * t, 0) / 16000
        waves.append(0.5 * torch.sin(phase) + 0.3 * torch.sin(2.7 * phase) + 0.01 * torch.randn(16000, generator=gen))
    lengths = torch.tensor([16000 - 1600 * i for i in range(n)])
    batch = torch.stack(waves) * valid_mask(lengths, 16000)
    return LogMelFrontend()(batch, lengths)


def test_bestrq_forward_loss_and_metrics():
    torch.manual_seed(0)
    model = _tiny_model()
    features, lengths = _sine_features()
    out = model(features, lengths, generator=torch.Generator().manual_seed(0))
    assert abs(out.loss.item() - math.log(64)) < 0.5  # untrained heads: about uniform
    torch.testing.assert_close(out.loss, out.loss_sum / out.n_masked)
    valid_frames = int(model.encoder.output_lengths(lengths).sum())
    assert 0 < out.n_masked <= valid_frames
    m = out.metrics
    assert abs(m["masked_fraction"] - out.n_masked / valid_frames) < 1e-6
    assert {f"accuracy/{i}" for i in range(4)} | {f"usage_perplexity/{i}" for i in range(4)} <= set(m)
    assert all(1.0 <= m[f"usage_perplexity/{i}"] <= 64.0 for i in range(4))
    out.loss.backward()
    assert model.heads[0].weight.grad is not None and model.encoder.layers[0].attn.q_proj.weight.grad is not None
    assert all(not b.requires_grad for b in model.quantizer.buffers())
    assert not any(n.startswith("quantizer") for n, _ in model.named_parameters())


def test_bestrq_loss_decreases_in_a_few_steps():
    torch.manual_seed(0)
    model = _tiny_model().train()
    features, lengths = _sine_features()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        out = model(features, lengths, generator=gen)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, losses
    assert out.metrics["accuracy"] > 1 / 64
