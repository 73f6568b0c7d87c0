"""The one composed model with images and speech together: a medium that is dropped changes the logits after it
and not before; image + speech in one sample equal its parts where they do not interact; mixed batches equal
each sample alone; generation with both media equals the full forward; bad media inputs fail with one clear
line; the placement plan already places video; per-modality freezing."""
import pytest
import torch

from adapters import ImageInputs, MediaError, MultimodalConfig, MultimodalModel, SpeechInputs
from adapters.freezing import FreezePolicy
from adapters.image_tokens import ImageBatchError, ImageTextCollator
from adapters.multimodal_config import ImageModality, SpeechModality
from adapters.placement import PlacementPlan, every_nth_block
from adapters.special_tokens import SpecialTokens, encode_with_media
from adapters.speech_adapter import preset as adapter_preset
from adapters.speech_inputs import SpeechInputError, audio_span
from language.config import preset as llama_preset
from language.model import Llama
from speech.conformer import ConformerConfig
from vision.config import preset as vision_preset
from vision.tiling import TiledImage, TilingConfig, aspect_ratio_id

VOCAB = 64
# Comparisons across different sequence lengths or paddings: float32 sums of ~1e3 terms of magnitude ~1 (attention
# over <= 40 keys, 64-wide dots, 4 layers) in another order agree to ~1e3 * 2**-24 ~ 6e-5, not exactly; logits are
# O(1). Same-shaped comparisons (a medium swapped, a dummy image no token sees) are exact.
BATCH_ATOL = 1e-4


def tiled(layout=(1, 1), seed=0):
    rows, cols = layout
    tiles = torch.randn(rows * cols, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    return TiledImage(tiles, layout, aspect_ratio_id(layout, 4), (28 * rows, 28 * cols), (28 * rows, 28 * cols))


def build(image=True, speech=True, seed=0):
    torch.manual_seed(seed)
    lm = Llama(llama_preset("tiny", vocab_size=VOCAB, n_layers=4, max_seq_len=128))
    config = MultimodalConfig(
        language=lm.config,
        image=ImageModality(vision=vision_preset("tiny", n_layers=2, n_global_layers=1, intermediate_layers=[0, 1]),
                            cross_attention_every=2, max_images=2) if image else None,
        speech=SpeechModality(encoder=ConformerConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64),
                              adapter=adapter_preset("tiny", encoder_dim=32, lm_dim=lm.config.dim)) if speech else None)
    model = MultimodalModel(config, language_model=lm)
    if image:  # "trained" gates: non-zero, so the image reaches the text
        with torch.no_grad():
            for block in model.cross_attention_layers:
                block.cross_attn_attn_gate.fill_(0.8)
                block.cross_attn_mlp_gate.fill_(-0.6)
    return lm, model.eval()


def utterances(model, seconds=(1.0, 0.75), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = [int(16000 * s) for s in seconds]
    waves = torch.zeros(len(n), max(n))
    for i, k in enumerate(n):
        waves[i, :k] = torch.randn(k, generator=g) * 0.1
    speech = model.speech_features(waves, torch.tensor(n))
    return speech, [model.placeholder_count(int(f)) for f in speech.lengths]


def collate(model, samples):
    tiling = TilingConfig(tile_size=28, max_tiles=4, max_images=2)
    return ImageTextCollator(image_token_id=model.tokens.image, tiling=tiling)(samples)


def one(speech: SpeechInputs, i: int) -> SpeechInputs:
    return SpeechInputs(speech.features[i:i + 1], speech.lengths[i:i + 1])


@torch.no_grad()
def test_dropping_the_image_changes_the_logits_after_its_token_and_not_before():
    lm, model = build(speech=False)
    t = model.tokens
    tokens = [1, 2, 3, t.image, 4, 5, 6]
    with_image = collate(model, [{"tokens": tokens, "images": [tiled((1, 2), 1)]}])
    logits = model(with_image["tokens"], images=ImageInputs.from_batch(with_image))
    text_only = lm(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    torch.testing.assert_close(logits[0, :3], text_only[0, :3], rtol=0, atol=BATCH_ATOL)  # before the image: the LM
    base = model(torch.tensor([[1, 2, 3, t.image, 4, 5, 6]]), run_encoder=True)  # dummy image no token sees
    assert torch.equal(logits[0, :3], base[0, :3])
    assert (logits[0, 3:] - base[0, 3:]).abs().amax(-1).min() > 1e-3  # every position from the image on


def test_an_image_token_without_its_image_is_an_error():
    _, model = build(speech=False)
    with pytest.raises(MediaError, match="no images"):
        model(torch.tensor([[1, model.tokens.image, 2]]))


@torch.no_grad()
def test_dropping_the_audio_changes_the_logits_after_it_and_not_before():
    lm, model = build(image=False)
    speech, n = utterances(model)
    t = model.tokens
    tokens = torch.tensor([[1, 2, 3] + audio_span(n[0], t.audio_tokens) + [4, 5]])
    logits = model(tokens, speech=one(speech, 0))
    other, _ = utterances(model, seconds=(1.0,), seed=1)  # another utterance of the same length
    swapped = model(tokens, speech=one(other, 0))
    assert torch.equal(logits[0, :4], swapped[0, :4])  # up to and including <|audio_start|>
    torch.testing.assert_close(logits[0, :3], lm(torch.tensor([[1, 2, 3]]))[0], rtol=0, atol=BATCH_ATOL)
    end = 4 + n[0]
    assert (logits[0, 4:] - swapped[0, 4:]).abs().amax(-1).min() > 1e-4  # every placeholder and what follows
    assert (logits[0, end:] - swapped[0, end:]).abs().amax() > 1e-3


@torch.no_grad()
def test_image_and_speech_in_one_sample_equal_its_parts_where_they_do_not_interact():
    lm, model = build()
    speech, n = utterances(model)
    t = model.tokens
    image = [tiled((1, 2), 3)]
    prefix = [1, t.image, 2, 3]
    both = prefix + audio_span(n[0], t.audio_tokens) + [4, 5]
    batch = collate(model, [{"tokens": both, "images": image}])
    joint = model(batch["tokens"], images=ImageInputs.from_batch(batch), speech=one(speech, 0))
    # before the audio: the image-only prefix
    alone = collate(model, [{"tokens": prefix, "images": image}])
    image_only = model(alone["tokens"], images=ImageInputs.from_batch(alone))
    torch.testing.assert_close(joint[0, :len(prefix)], image_only[0], rtol=0, atol=BATCH_ATOL)
    # before the image: the LM
    torch.testing.assert_close(joint[0, :1], lm(torch.tensor([[1]]))[0], rtol=0, atol=BATCH_ATOL)
    # the audio changes what follows it, the image too
    other, _ = utterances(model, seconds=(1.0,), seed=2)
    assert (joint[0, -2:] - model(batch["tokens"], images=ImageInputs.from_batch(batch),
                                  speech=one(other, 0))[0, -2:]).abs().amax() > 1e-3
    blank = collate(model, [{"tokens": both, "images": [tiled((1, 2), 9)]}])
    assert (joint[0, -2:] - model(blank["tokens"], images=ImageInputs.from_batch(blank),
                                  speech=one(speech, 0))[0, -2:]).abs().amax() > 1e-3


@torch.no_grad()
def test_a_mixed_batch_equals_each_sample_alone():
    lm, model = build()
    speech, n = utterances(model)
    t = model.tokens
    samples = [
        {"tokens": [t.image, 1, 2] + audio_span(n[0], t.audio_tokens) + [3], "images": [tiled((2, 2), 1)]},
        {"tokens": [7, 8, 9, 10]},
        {"tokens": [5] + audio_span(n[1], t.audio_tokens) + [6, 7]},
        {"tokens": [1, t.image, 4, 5], "images": [tiled((1, 1), 2)]},
    ]
    batch = collate(model, samples)
    out = model(batch["tokens"], images=ImageInputs.from_batch(batch), speech=speech,
                attention_mask=batch["attention_mask"])
    which = {0: 0, 2: 1}
    for b, sample in enumerate(samples):
        alone = collate(model, [sample])
        sp = one(speech, which[b]) if b in which else None
        ref = model(alone["tokens"], images=ImageInputs.from_batch(alone), speech=sp)
        k = len(sample["tokens"])
        torch.testing.assert_close(out[b, :k], ref[0], rtol=0, atol=BATCH_ATOL, msg=f"sample {b}")
    torch.testing.assert_close(out[1, :4], lm(torch.tensor([[7, 8, 9, 10]]))[0], rtol=0, atol=BATCH_ATOL)


@torch.no_grad()
def test_generation_with_image_and_speech_equals_the_full_forward():
    _, model = build()
    speech, n = utterances(model)
    t = model.tokens
    prompts = [[1, t.image, 2] + audio_span(n[0], t.audio_tokens) + [3], [4] + audio_span(n[1], t.audio_tokens)]
    images = [[tiled((1, 2), 4)], []]
    out = model.generate(prompts, images=images, speech=speech, max_new_tokens=4)
    for b, (prompt, new) in enumerate(zip(prompts, out)):  # greedy: each token is the argmax of the full forward
        sample = {"tokens": prompt + new[:-1]}
        if images[b]:
            sample["images"] = images[b]
        batch = collate(model, [sample])
        logits = model(batch["tokens"], images=ImageInputs.from_batch(batch), speech=one(speech, b))
        assert logits[0, len(prompt) - 1:].argmax(-1).tolist() == new


def test_more_media_than_placeholders_and_the_reverse_are_clear_errors():
    _, model = build()
    speech, n = utterances(model)
    t = model.tokens
    span = audio_span(n[0], t.audio_tokens)
    with pytest.raises(MediaError, match="1 audio span.*2 utterance"):
        model.generate([[1] + span], speech=speech, max_new_tokens=1)
    with pytest.raises(MediaError, match="2 audio span.*0 utterance"):
        model.generate([[1] + span + span], max_new_tokens=1)
    with pytest.raises(ImageBatchError, match="prompt 0"):
        model.generate([[1, t.image, 2]], images=[[tiled(), tiled(seed=1)]], max_new_tokens=1)
    with pytest.raises(MediaError, match="no images"):
        model.generate([[1, t.image, 2]], max_new_tokens=1)
    with pytest.raises(SpeechInputError, match="1 audio spans but 2 utterances"):
        model(torch.tensor([[1] + span]), speech=speech)


def test_media_for_a_model_without_that_modality_are_clear_errors():
    _, image_only = build(speech=False)
    _, speech_only = build(image=False)
    t = image_only.tokens
    with pytest.raises(MediaError, match="<\\|audio_start\\|> but this model has no speech modality"):
        image_only(torch.tensor([[1] + audio_span(2, t.audio_tokens)]))
    with pytest.raises(MediaError, match="<\\|image\\|> but this model has no image modality"):
        speech_only(torch.tensor([[1, t.image]]))
    speech, _ = utterances(speech_only)
    with pytest.raises(MediaError, match="speech given to a model without a speech modality"):
        image_only(torch.tensor([[1]]), speech=speech)
    with pytest.raises(MediaError, match="no image modality"):
        speech_only.generate([[1]], images=[[tiled()]], max_new_tokens=1)


def test_placement_plan_places_video_before_every_fourth_image_block():
    image = list(range(3, 32, 4))  # Llama 3.2 Vision: before layers 3, 7, ..., 31
    video = every_nth_block(image, 4)
    assert video == [3, 19]
    plan = PlacementPlan(32, {"image": image, "video": video})
    assert plan.at(3) == [("video", 0), ("image", 0)]
    assert plan.at(19) == [("video", 1), ("image", 4)]
    assert plan.at(7) == [("image", 1)] and plan.at(4) == []
    with pytest.raises(ValueError, match="audio"):
        PlacementPlan(32, {"audio": [1]})
    with pytest.raises(ValueError, match="0..32"):
        PlacementPlan(32, {"image": [33]})


def test_special_tokens_one_registry():
    tokens = SpecialTokens.after_vocab(128256)
    assert (tokens.image, tokens.video, tokens.audio_start, tokens.audio, tokens.audio_end) == tuple(
        range(128256, 128261))
    assert tokens.n_extra == 5
    meta = SpecialTokens.after_vocab(128256, image=128011)  # Meta's reserved id inside the vocabulary
    assert meta.image == 128011 and meta.video == 128256 and meta.n_extra == 4
    assert SpecialTokens.from_dict(tokens.as_dict()) == tokens

    class Chars:
        def encode(self, text, bos=False):
            return [ord(c) % 50 for c in text]
    assert encode_with_media(Chars(), "ab<|image|>c", tokens) == [ord("a") % 50, ord("b") % 50, 128256, ord("c") % 50]
    with pytest.raises(ValueError, match="audio spans are built"):
        encode_with_media(Chars(), "a<|audio|>", tokens)


def test_freezing_per_modality():
    _, model = build()
    model.freeze_for_stage(FreezePolicy(modalities=["speech"]))
    trains = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"speech_encoder", "speech_adapter", "extra_token_embeddings"}
    model.freeze_for_stage(FreezePolicy(train_encoder=False))
    trains = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"speech_adapter", "multi_modal_projector", "cross_attention_layers", "extra_token_embeddings"}
    model.train()
    assert not model.language_model.training and not model.vision_model.training and model.speech_adapter.training


def test_zero3_mode_runs_every_module_on_a_text_batch_and_changes_nothing():
    lm, model = build()
    model.config.image.always_run_encoder = model.config.speech.always_run_encoder = True
    model.train()
    tokens = torch.tensor([[1, 2, 3, 4]])
    loss, count = model.loss_sum(tokens, torch.tensor([[2, 3, 4, -100]]))
    loss.backward()
    for name in ("vision_model", "multi_modal_projector", "cross_attention_layers", "speech_encoder", "speech_adapter"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name  # every module took part in the graph
    with torch.no_grad():
        assert torch.equal(model(tokens), lm(tokens))
