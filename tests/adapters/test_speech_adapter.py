"""Speech adapter (shapes, lengths, padding) and writing its outputs into a Llama input sequence."""
import pytest
import torch

from adapters.speech_adapter import SpeechAdapter, preset
from adapters.speech_inputs import (AudioTokens, SpeechInputError, audio_placeholder_count, audio_segments,
                                    prompt_with_audio, scatter_speech, speech_inputs)
from language import Llama
from language import preset as llama_preset
from speech.conformer import ConformerEncoder
from speech.conformer import preset as conformer_preset
from speech.features import valid_mask

IDS = AudioTokens(start_id=500, placeholder_id=501, end_id=502)


def test_adapter_shapes_lengths_and_paper_size():
    torch.manual_seed(0)
    adapter = SpeechAdapter(preset("tiny", lm_dim=48))
    hidden, lengths = torch.randn(3, 13, 64), torch.tensor([13, 6, 1])
    out, out_lengths = adapter(hidden, lengths)
    assert out.shape == (3, 7, 48) and out_lengths.tolist() == [7, 3, 1]  # ceil(T / 2): 80 ms frames
    assert out[1, 3:].abs().sum() == 0 and out[2, 1:].abs().sum() == 0
    with torch.device("meta"):
        paper = SpeechAdapter(preset("paper"))
    conv = 1536 * 3072 * 3 + 3072
    attention = 4 * (3072 * 3072 + 3072)
    ffn = 3072 * 4096 + 4096 + 4096 * 3072 + 3072
    layer_norms = 3 * 2 * 3072  # attention, FFN, final
    projection = 3072 * 4096 + 4096
    assert paper.num_parameters() == conv + attention + ffn + layer_norms + projection == 89_698_304
    with pytest.raises(ValueError, match="did you mean 'paper'"):
        preset("papr")
    with pytest.raises(ValueError, match=r"\(B, T, 64\)"):
        adapter(torch.randn(2, 5, 32), torch.tensor([5, 5]))


def test_adapter_and_encoder_padded_batch_equals_each_utterance_alone():
    torch.manual_seed(0)
    encoder = ConformerEncoder(conformer_preset("tiny")).eval()
    adapter = SpeechAdapter(preset("tiny")).eval()
    lengths = torch.tensor([61, 30, 13, 5])
    features = torch.randn(4, 61, 80)
    features[~valid_mask(lengths, 61)] = 7.0
    out, out_lengths = adapter(*encoder(features, lengths))
    for i, n in enumerate(lengths.tolist()):
        alone, alone_lengths = adapter(*encoder(features[i:i + 1, :n], lengths[i:i + 1]))
        assert out_lengths[i] == alone_lengths[0] == audio_placeholder_count(n)
        # other shapes, other summation orders: encoder + adapter matmuls sum K ~ 2.3e3 terms in a chain (see
        # test_conformer): <= K*u = 1.4e-4 relative; padding (7.0) that leaked would be off by O(1)
        torch.testing.assert_close(out[i:i + 1, :alone_lengths[0]], alone, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("n_frames", [1, 4, 5, 8, 9, 16, 17, 100, 301])
def test_placeholder_count_matches_the_modules(n_frames):
    encoder = ConformerEncoder(conformer_preset("tiny"))
    adapter = SpeechAdapter(preset("tiny"))
    expected = adapter.output_lengths(encoder.output_lengths(torch.tensor([n_frames])))
    assert audio_placeholder_count(n_frames) == int(expected)


def test_prompt_builder_and_segments():
    tokens = prompt_with_audio([1, 2], 3, IDS, after=[9])
    assert tokens == [1, 2, 500, 501, 501, 501, 502, 9]
    batch = torch.tensor([tokens + [0, 0], [500, 501, 502, 7] + [500, 501, 501, 502] + [0, 0]])
    assert audio_segments(batch, IDS) == [(0, 3, 3), (1, 1, 1), (1, 5, 2)]


def test_speech_inputs_mask_values_in_reading_order():
    batch = torch.tensor([[1, 500, 501, 501, 501, 502, 9, 0],
                          [500, 501, 502, 4, 500, 501, 501, 502]])
    speech = torch.arange(3 * 3 * 2, dtype=torch.float32).view(3, 3, 2)
    mask, values = speech_inputs(batch, speech, torch.tensor([3, 1, 2]), IDS)
    assert torch.equal(mask, batch == 501)
    torch.testing.assert_close(values, torch.cat([speech[0, :3], speech[1, :1], speech[2, :2]]))
    embeds = torch.zeros(2, 8, 2)
    written = scatter_speech(embeds, mask, values)
    torch.testing.assert_close(written[1, 5:7], speech[2, :2])
    torch.testing.assert_close(written[0, 2:5], speech[0, :3])
    assert written[~mask].abs().sum() == 0


@pytest.mark.parametrize("row, lengths, message", [
    ([1, 500, 501, 501, 502], [3], r"sample 0, audio span 0 \(positions 2..3\): 2 placeholders but utterance 0 has 3"),
    ([1, 500, 501, 501, 0], [2], "sample 0: audio span opened at position 1 is never closed"),
    ([501, 500, 501, 502, 0], [1], "sample 0: audio placeholder at position 0 is not inside"),
    ([500, 501, 500, 501, 502], [1], "start marker at position 2 inside"),
    ([1, 2, 502, 0, 0], [1], "end marker at position 2 without a start"),
    ([500, 501, 7, 501, 502], [2], "not inside a contiguous"),
    ([500, 501, 502, 500, 502], [1, 1], "positions 3..4 has no placeholder"),
])
def test_speech_inputs_errors_name_the_sample(row, lengths, message):
    tokens = torch.tensor([[1, 2, 3, 4, 5], row])
    speech = torch.zeros(len(lengths), 4, 8)
    with pytest.raises(SpeechInputError, match=message.replace("sample 0", "sample 1")):
        speech_inputs(tokens, speech, torch.tensor(lengths), IDS)


def test_speech_inputs_counts_utterances():
    tokens = torch.tensor([[500, 501, 502]])
    with pytest.raises(SpeechInputError, match="1 audio spans but 2 utterances"):
        speech_inputs(tokens, torch.zeros(2, 1, 8), torch.tensor([1, 1]), IDS)


def test_speech_reaches_a_frozen_llama_through_inputs_embeds():
    torch.manual_seed(0)
    lm = Llama(llama_preset("tiny")).eval().requires_grad_(False)
    encoder = ConformerEncoder(conformer_preset("tiny"))
    adapter = SpeechAdapter(preset("tiny", lm_dim=lm.config.dim))
    feature_lengths = torch.tensor([40, 23])
    features = torch.randn(2, 40, 80)
    speech, speech_lengths = adapter(*encoder(features, feature_lengths))
    rows = [prompt_with_audio([1, 17, 33], int(n), IDS, after=[44, 45]) for n in speech_lengths]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask, values = speech_inputs(tokens, speech, speech_lengths, IDS)
    inputs = scatter_speech(lm.model.embed_tokens(tokens), mask, values)
    logits = lm(inputs_embeds=inputs)
    assert logits.shape == (2, width, 512)
    logits[0, -1].logsumexp(-1).backward()
    assert adapter.proj.weight.grad.abs().sum() > 0 and encoder.stacker.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())
    # causal: the prefix before the audio is untouched by the speech; what follows depends on it
    with torch.no_grad():
        other = scatter_speech(lm.model.embed_tokens(tokens), mask, values + 1.0)
        changed = lm(inputs_embeds=other)
    torch.testing.assert_close(changed[:, :4], logits[:, :4].detach())
    assert (changed[0, -1] - logits[0, -1]).abs().max() > 1e-4
