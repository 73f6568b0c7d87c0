"""The speech side of the composed model (`MultimodalModel` with a speech modality): audio spans in chat prompts,
embeddings written at the right places, only the encoder, adapter and marker rows train (the LM stays
bit-identical), the loss is on the target tokens only and the fast loss equals the full-logits loss, a padded
batch equals each utterance alone, and batched greedy decoding with the KV cache equals step-by-step argmax
without a cache."""
import pytest
import torch
import torch.nn.functional as F

from adapters.multimodal import MediaError, MultimodalModel, SpeechInputs
from adapters.multimodal_config import ImageModality, MultimodalConfig, SpeechModality
from adapters.speech_adapter import preset as adapter_preset
from adapters.speech_adapter import span_position_code
from adapters.speech_inputs import SpeechInputError
from adapters.speech_prompts import IGNORE_INDEX, SpeechPrompter, collate_examples
from language import Llama
from language import preset as llama_preset
from language.chat_format import chat_format_for
from language.tokenizer import train_bpe
from speech.conformer import preset as conformer_preset

TEXT = "four seven one two turn on the kitchen light open the door set a timer for ten minutes " * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    (folder / "text.txt").write_text(TEXT)
    return train_bpe([folder / "text.txt"], 300, folder)


def _model(tokenizer, seed=0, lm=None, span_position=0.0, image=None):
    torch.manual_seed(seed)
    if lm is None:
        lm = Llama(llama_preset("tiny", vocab_size=tokenizer.vocab_size, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64))
    speech = SpeechModality(encoder=conformer_preset("tiny", dim=32, n_heads=2, ffn_dim=64, n_layers=1),
                            adapter=adapter_preset("tiny", encoder_dim=32, dim=32, n_heads=2, ffn_dim=64, lm_dim=32,
                                                   span_position=span_position))
    return MultimodalModel(MultimodalConfig(language=lm.config, image=image, speech=speech), language_model=lm)


def _batch(model, prompter, frames=(37, 20, 9), targets=("four seven", "open the door", "ten")):
    features = torch.randn(len(frames), max(frames), 80)
    lengths = torch.tensor(frames)
    examples = [prompter.example(model.placeholder_count(f), t) for f, t in zip(frames, targets)]
    tokens, labels, mask = collate_examples(examples)
    return tokens, labels, mask, SpeechInputs(features, lengths)


def test_prompt_layout_labels_and_placeholder_count(tokenizer):
    model = _model(tokenizer)
    ids = model.tokens.audio_tokens
    # past the LM vocabulary, after <|image|> and <|video|>
    assert (ids.start_id, ids.placeholder_id, ids.end_id) == tuple(tokenizer.vocab_size + i for i in (2, 3, 4))
    prompter = SpeechPrompter(chat_format_for(tokenizer), ids, "asr")
    n = model.placeholder_count(37)
    speech, lengths = model.encode_speech(torch.randn(1, 37, 80), torch.tensor([37]))
    assert n == speech.shape[1] == int(lengths[0]) == 5  # ceil(ceil(37 / 4) / 2)
    example = prompter.example(n, "four seven")
    prompt = prompter.prompt(n)
    assert example.ids[:len(prompt)] == prompt  # the generation prompt is the example's prefix
    assert prompt.count(ids.placeholder_id) == n and prompt.count(ids.start_id) == prompt.count(ids.end_id) == 1
    start = prompt.index(ids.start_id)
    assert prompt[start:start + n + 2] == [ids.start_id] + [ids.placeholder_id] * n + [ids.end_id]
    text = tokenizer.decode([i for i in prompt if i < tokenizer.vocab_size])
    assert "Repeat after me in English:" in text and text.index("system") < text.index("user")
    labelled = [t for t, lab in zip(example.ids, example.labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(labelled[:-1]) == "four seven" and labelled[-1] in prompter.stop_ids
    ast = SpeechPrompter(chat_format_for(tokenizer), ids, "ast")
    assert "Translate the following sentence into English:" in tokenizer.decode(
        [i for i in ast.prompt(3, "en") if i < tokenizer.vocab_size])


def test_collated_labels_are_the_next_target_token_only(tokenizer):
    """House convention: labels[t] is the token at t + 1 where that token is the target or its stop token, and
    IGNORE_INDEX everywhere else (system, audio span, headers, padding)."""
    model = _model(tokenizer)
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens)
    targets = ("four seven", "open the door", "ten")
    tokens, labels, mask, speech = _batch(model, prompter, targets=targets)
    for b, target in enumerate(targets):
        keep = labels[b] != IGNORE_INDEX
        assert torch.equal(labels[b, :-1][keep[:-1]], tokens[b, 1:][keep[:-1]]) and not keep[-1]
        assert not keep[~mask[b]].any()  # no label at padding
        answer = labels[b, keep].tolist()
        assert tokenizer.decode(answer[:-1]) == target and answer[-1] in prompter.stop_ids
        assert all(t < tokenizer.vocab_size for t in answer)


def test_speech_written_at_audio_tokens_and_prefix_unchanged(tokenizer):
    model = _model(tokenizer).eval()
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens)
    tokens, _, mask, speech = _batch(model, prompter)
    embeddings, embedding_lengths = model.encode_speech(speech.features, speech.lengths)
    t = model.tokens
    with torch.no_grad():
        h = model.input_embeddings(tokens, speech)
    markers = model.extra_token_embeddings.weight
    assert torch.equal(h[tokens == t.audio_start], markers[t.audio_start - t.vocab_size].expand(3, -1))
    assert torch.equal(h[tokens == t.audio_end], markers[t.audio_end - t.vocab_size].expand(3, -1))
    expected = torch.cat([embeddings[u, :n] for u, n in enumerate(embedding_lengths.tolist())])
    assert torch.equal(h[tokens == t.audio], expected)
    text = tokens < t.vocab_size
    assert torch.equal(h[text], model.language_model.model.embed_tokens(tokens[text]))
    with torch.no_grad():
        logits = model(tokens, speech=speech, attention_mask=mask)
        text_only = model.language_model(tokens.masked_fill(~text, 0), attention_mask=mask)
    assert logits.shape == (3, tokens.shape[1], tokenizer.vocab_size)
    first_audio = int((~text[0]).nonzero()[0])
    torch.testing.assert_close(logits[:, :first_audio], text_only[:, :first_audio], rtol=0, atol=0)  # causal
    assert not torch.allclose(logits[:, first_audio:], text_only[:, first_audio:])
    with pytest.raises(SpeechInputError, match="placeholders but utterance"):
        model(tokens, speech=SpeechInputs(speech.features, speech.lengths.flip(0)))
    with pytest.raises(MediaError, match="no speech was given"):
        model(tokens)


def test_span_position_code_is_added_to_each_placeholder_by_its_index_in_the_span(tokenizer):
    code = span_position_code(6, 32)
    assert code.shape == (6, 32) and torch.equal(code[0], torch.tensor([0.0, 1.0] * 16))
    assert float(code.abs().max()) <= 1 and torch.linalg.matrix_rank(code) == 6  # every position distinct
    model = _model(tokenizer, span_position=2.0).eval()
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens)
    tokens, _, mask, speech = _batch(model, prompter)
    embeddings, embedding_lengths = model.encode_speech(speech.features, speech.lengths)
    with torch.no_grad():
        h = model.input_embeddings(tokens, speech)
    std = float(model.language_model.model.embed_tokens.weight.std())
    full = span_position_code(embeddings.shape[1], 32)
    expected = torch.cat([embeddings[u, :n] + 2.0 * std * full[:n] for u, n in enumerate(embedding_lengths.tolist())])
    torch.testing.assert_close(h[tokens == model.tokens.audio], expected)
    plain = _model(tokenizer, span_position=0.0).eval()  # same seed: same weights, no code
    with torch.no_grad():
        assert not torch.allclose(model(tokens, speech=speech, attention_mask=mask),
                                  plain(tokens, speech=speech, attention_mask=mask))
    # the embedding std is cached, but follows every change of the table: an optimizer step, a load
    table = model.language_model.model.embed_tokens.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([table], lr=0.5)
    (table ** 3).sum().backward()
    optimizer.step()
    stepped = float(table.detach().std())
    assert model._embedding_std() == pytest.approx(stepped) and stepped != pytest.approx(std)
    model.language_model.load_state_dict({**model.language_model.state_dict(),
                                          "model.embed_tokens.weight": 3 * table.detach()})
    # std of 3 * table (each element rounded again) vs 3 * std: a float32 reduction over the whole table rounds by
    # ~log2(N) * u ~ 1e-6 relative; a stale cache is off by a factor 3
    assert model._embedding_std() == pytest.approx(3 * stepped, rel=1e-5)


def test_only_encoder_and_adapter_train_and_lm_stays_bit_identical(tokenizer):
    model = _model(tokenizer)
    lm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens)
    tokens, labels, mask, speech = _batch(model, prompter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    model.train()
    assert not model.language_model.training and model.speech_encoder.training
    t = model.tokens
    for _ in range(3):
        loss_sum, n = model.loss_sum(tokens, labels, speech=speech, attention_mask=mask)
        (loss_sum / n).backward()
        assert all(p.grad is None for p in model.language_model.parameters())
        for module in (model.speech_encoder, model.speech_adapter, model.extra_token_embeddings):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        rows = model.extra_token_embeddings.weight.grad.abs().sum(-1).nonzero().flatten().tolist()
        assert rows == [t.audio_start - t.vocab_size, t.audio_end - t.vocab_size]  # the markers, not the placeholders
        optimizer.step()
        optimizer.zero_grad()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.split(".")[0] in ("speech_encoder", "speech_adapter", "extra_token_embeddings")
                         for n in names)
    for k, v in model.language_model.state_dict().items():
        assert torch.equal(v, lm_before[k]), k


def test_fast_loss_equals_full_logits_loss(tokenizer):
    model = _model(tokenizer).eval()
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens)
    tokens, labels, mask, speech = _batch(model, prompter)
    with torch.no_grad():
        loss_sum, n = model.loss_sum(tokens, labels, speech=speech, attention_mask=mask)
        logits = model(tokens, speech=speech, attention_mask=mask)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    assert int(n) == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_sum, reference, rtol=1e-5, atol=1e-4)


def test_padded_batch_equals_each_utterance_alone(tokenizer):
    model = _model(tokenizer, seed=1).eval()
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens)
    frames = (37, 20, 9)
    tokens, labels, mask, speech = _batch(model, prompter, frames=frames)
    with torch.no_grad():
        batched = model(tokens, speech=speech, attention_mask=mask)
        for b, f in enumerate(frames):
            n = int(mask[b].sum())
            one = SpeechInputs(speech.features[b:b + 1, :f], speech.lengths[b:b + 1])
            alone = model(tokens[b:b + 1, :n], speech=one)
            torch.testing.assert_close(batched[b:b + 1, :n], alone)


def test_batched_greedy_decoding_equals_uncached_argmax(tokenizer):
    model = _model(tokenizer, seed=3).eval()
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens)
    frames = (41, 13, 26)
    features, lengths = torch.randn(3, 41, 80), torch.tensor(frames)
    prompts = [prompter.prompt(model.placeholder_count(f)) for f in frames]
    out = model.generate(prompts, speech=SpeechInputs(features, lengths), max_new_tokens=6,
                         stop_ids=prompter.stop_ids)
    for i, prompt in enumerate(prompts):  # each alone, no cache: append the argmax token by token
        ids = list(prompt)
        expected = []
        for _ in range(6):
            with torch.no_grad():
                one = SpeechInputs(features[i:i + 1, :frames[i]], lengths[i:i + 1])
                logits = model(torch.tensor([ids]), speech=one)
            token = int(logits[0, -1].argmax())
            if token in prompter.stop_ids:
                break
            expected.append(token)
            ids.append(token)
        assert out[i] == expected, i
    # precomputed adapter outputs decode the same as the features they came from
    embeddings, embedding_lengths = model.encode_speech(features, lengths)
    assert model.generate(prompts, speech=SpeechInputs(embeddings=embeddings, embedding_lengths=embedding_lengths),
                          max_new_tokens=6, stop_ids=prompter.stop_ids) == out


def test_with_an_image_modality_image_and_speech_in_one_prompt(tokenizer):
    from vision.config import preset as vision_preset
    from vision.tiling import TilingConfig, tile_image

    model = _model(tokenizer, image=ImageModality(vision=vision_preset("tiny"))).eval()
    t = model.tokens
    assert t.audio_start > t.image  # past <|image|>
    prompter = SpeechPrompter(chat_format_for(tokenizer), t.audio_tokens)
    frames = 21
    prompt = [t.image] + prompter.prompt(model.placeholder_count(frames))  # <|image|> first
    speech = SpeechInputs(torch.randn(1, frames, 80), torch.tensor([frames]))
    vision = model.config.image.vision
    tiling = TilingConfig(tile_size=vision.image_size, max_tiles=vision.max_num_tiles)
    image = tile_image(torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8), tiling)
    out = model.generate([prompt], images=[[image]], speech=speech, max_new_tokens=3)
    no_image = model.generate([prompt[1:]], speech=speech, max_new_tokens=3)
    assert len(out[0]) == len(no_image[0]) == 3
    with torch.no_grad():  # without images the model is its speech half: same logits as a speech-only model
        alone = _model(tokenizer, lm=model.language_model).eval()
        alone.load_state_dict({k: v for k, v in model.state_dict().items()
                               if k.startswith(("speech_", "extra_token_embeddings."))}, strict=False)
        p2 = SpeechPrompter(chat_format_for(tokenizer), alone.tokens.audio_tokens)
        p2 = p2.prompt(model.placeholder_count(frames))
        a = model(torch.tensor([prompt[1:]]), speech=speech)
        b = alone(torch.tensor([p2]), speech=speech)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
