"""The composed vision-language model around a frozen tiny Llama: exact equality with the LM while the gates
are closed, exact zero for tokens that see no image, freezing and gradients, speech-style embeddings,
ZeRO-3's always-run mode, and generation with cached image keys/values."""
import pytest
import torch

from adapters.image_tokens import ImageTextCollator
from adapters.vision_language import VisionLanguageConfig, VisionLanguageModel
from language.config import preset as llama_preset
from language.generation import generate as generate_text
from language.model import Llama
from vision.config import preset as vision_preset
from vision.tiling import TiledImage, TilingConfig, aspect_ratio_id

VOCAB = 64
HF_IMAGE = VOCAB  # Mllama style: one past the vocabulary, from the extra token embeddings
META_IMAGE = 60  # Meta style: a reserved id inside the vocabulary


def tiled(layout=(1, 1), seed=0):
    rows, cols = layout
    tiles = torch.randn(rows * cols, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    return TiledImage(tiles, layout, aspect_ratio_id(layout, 4), (28 * rows, 28 * cols), (28 * rows, 28 * cols))


def build(image_token=HF_IMAGE, **kw):
    torch.manual_seed(0)
    lm = Llama(llama_preset("tiny", vocab_size=VOCAB, n_layers=4, max_seq_len=64))
    config = VisionLanguageConfig(language=lm.config, vision=vision_preset("tiny", n_layers=2, n_global_layers=1,
                                                                            intermediate_layers=[0, 1]),
                                  cross_attention_every=2, image_token_id=image_token, **kw)
    return lm, VisionLanguageModel(config, language_model=lm)


def open_gates(model, value=0.8):
    with torch.no_grad():
        for block in model.cross_attention_layers:
            block.cross_attn_attn_gate.fill_(value)
            block.cross_attn_mlp_gate.fill_(-value)


def mixed_batch(image_token=HF_IMAGE):
    i = image_token
    samples = [
        {"tokens": [i, 1, 2, 3, i, 4, 5, 6], "images": [tiled((1, 2), 1), tiled((2, 2), 2)]},  # 2 images
        {"tokens": [7, 8, 9, 10, 11]},  # text only
        {"tokens": [1, 2, 3, i, 12, 13], "images": [tiled((1, 1), 3)]},  # text before the image
    ]
    return ImageTextCollator(image_token_id=i, tiling=TilingConfig(tile_size=28, max_tiles=4, max_images=2))(samples)


def run(model, batch, **kw):
    return model(batch["tokens"], pixel_values=batch["pixel_values"], aspect_ratio_ids=batch["aspect_ratio_ids"],
                 aspect_ratio_mask=batch["aspect_ratio_mask"], cross_attention_mask=batch["cross_attention_mask"], **kw)


def test_state_dict_keeps_the_language_model_names():
    lm, model = build()
    names = set(model.state_dict())
    assert {f"language_model.{n}" for n in lm.state_dict()} <= names
    assert {"multi_modal_projector.weight", "extra_token_embeddings.weight",
            "cross_attention_layers.1.cross_attn.q_norm.weight", "vision_model.class_embedding"} <= names
    assert model.config.cross_attention_layers == [1, 3]
    # a language checkpoint (e.g. the instruct model) loads into `language_model` as is, and can be hot-swapped
    other = Llama(lm.config)
    model.language_model.load_state_dict(other.state_dict())
    model.swap_language_model(other)
    assert model.language_model is other and not any(p.requires_grad for p in other.parameters())
    with pytest.raises(ValueError, match="dim: 32 vs 64"):
        model.swap_language_model(Llama(llama_preset("tiny", vocab_size=VOCAB, n_layers=4, dim=32)))


@pytest.mark.parametrize("image_token", [HF_IMAGE, META_IMAGE])
def test_fresh_adapters_leave_the_logits_exactly_unchanged(image_token):
    lm, model = build(image_token)
    batch = mixed_batch(image_token)
    model.train()  # training mode changes nothing either
    with torch.no_grad():
        out = run(model, batch)
        ref = lm(batch["tokens"]) if image_token < VOCAB else lm(inputs_embeds=model.embed_tokens(batch["tokens"]))
    assert torch.equal(out, ref)


def test_tokens_that_see_no_image_are_exactly_the_language_model():
    lm, model = build(META_IMAGE)
    open_gates(model)
    batch = mixed_batch(META_IMAGE)
    with torch.no_grad():
        out, ref = run(model, batch), lm(batch["tokens"])
    assert torch.equal(out[1], ref[1])  # the text-only sample in an image batch
    assert torch.equal(out[2, :3], ref[2, :3])  # text before the first image
    assert (out[2, 3:6] - ref[2, 3:6]).abs().amax(-1).gt(1e-4).all()  # from the image on, the image matters
    assert (out[0] - ref[0]).abs().amax(-1).gt(1e-4).all()
    # pixels reach only the tokens that see them
    batch2 = dict(batch, pixel_values=batch["pixel_values"] * 2)
    with torch.no_grad():
        out2 = run(model, batch2)
    assert torch.equal(out2[1], out[1]) and torch.equal(out2[2, :3], out[2, :3])
    # a text-only batch skips the encoder and is the LM
    with torch.no_grad():
        assert torch.equal(model(batch["tokens"][1:2]), lm(batch["tokens"][1:2]))


def test_blocks_before_the_first_and_after_the_last_layer():
    lm, model = build(META_IMAGE, cross_attention_layers=[0, 4])
    open_gates(model)
    batch = mixed_batch(META_IMAGE)
    with torch.no_grad():
        out, ref = run(model, batch), lm(batch["tokens"])
    assert torch.equal(out[1], ref[1]) and not torch.equal(out[0], ref[0])
    with pytest.raises(ValueError, match=r"in 0..4"):
        build(cross_attention_layers=[5])


def test_gradients_reach_only_adapters_and_the_encoder_when_it_trains():
    lm, model = build()
    open_gates(model)
    batch = mixed_batch()
    model.train()
    assert not model.language_model.training and model.vision_model.training and model.cross_attention_layers.training
    run(model, batch).float().logsumexp(-1).mean().backward()
    trainable = {n for n, _ in model.trainable_parameters()}
    assert not any(n.startswith("language_model.") for n in trainable)
    assert all(p.grad is None for p in model.language_model.parameters())
    for name, p in model.named_parameters():
        if name.startswith(("cross_attention_layers.", "multi_modal_projector.", "vision_model.transformer.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # frozen encoder: no gradient, kept in eval mode, the adapters still learn
    model.zero_grad(set_to_none=True)
    model.freeze_for_stage("adapters_only")
    model.train()
    assert not model.vision_model.training
    run(model, batch).float().logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert model.multi_modal_projector.weight.grad.abs().sum() > 0
    assert {n for n, _ in model.trainable_parameters()} == {n for n in trainable if not n.startswith("vision_model.")}
    with pytest.raises(ValueError, match="unknown training stage 'sfft'.*did you mean 'sft'"):
        model.freeze_for_stage("sfft")


def test_always_run_encoder_on_text_only_batches():
    lm, model = build(always_run_encoder=True)
    open_gates(model)
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    model.train()
    out = model(tokens)
    assert torch.equal(out, lm(tokens))  # the dummy image is seen by no token
    out.float().logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():  # every module ran, so every trainable parameter has a gradient
        if p.requires_grad and not name.startswith("extra_token_embeddings"):
            assert p.grad is not None, name


def test_extra_embeds_replace_placeholder_embeddings():
    lm, model = build()
    tokens = torch.tensor([[1, 2, 0, 0, 3], [4, 0, 5, 6, 7]])
    where = tokens == 0
    values = torch.randn(int(where.sum()), 64, requires_grad=True)
    out = model(tokens, extra_embeds=(where, values))
    embeds = lm.model.embed_tokens(tokens).detach().clone()
    embeds[where] = values.detach()
    assert torch.equal(out, lm(inputs_embeds=embeds))
    assert torch.equal(model(inputs_embeds=embeds), out)
    out.sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"values must be \(3, 64\)"):
        model(tokens, extra_embeds=(where, values[:2]))
    with pytest.raises(ValueError, match="exactly one of tokens and inputs_embeds"):
        model(tokens, inputs_embeds=embeds)


def test_image_inputs_errors():
    _, model = build()
    batch = mixed_batch()
    with pytest.raises(ValueError, match="need a cross_attention_mask"):
        run(model, dict(batch, cross_attention_mask=None))
    with pytest.raises(ValueError, match="does not fit"):
        run(model, dict(batch, cross_attention_mask=batch["cross_attention_mask"][:, :3]))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(batch["tokens"], cross_attention_mask=batch["cross_attention_mask"])


def test_generation_with_cached_image_keys_equals_full_recompute():
    _, model = build(image_token_policy="most_recent")
    open_gates(model, 2.0)
    i = HF_IMAGE
    prompts = [[1, 2, i, 3, 4, i, 5], [6, 7, 8], [9, i, 10, 11]]
    images = [[tiled((1, 2), 1), tiled((1, 1), 2)], [], [tiled((2, 2), 3)]]
    model.train()
    new = model.generate(prompts, images, max_new_tokens=6)
    assert [len(n) for n in new] == [6, 6, 6]
    assert model.training and not model.language_model.training  # modes restored after generation
    model.eval()
    collate = ImageTextCollator(image_token_id=i, tiling=TilingConfig(tile_size=28, max_tiles=4, max_images=2),
                                policy="most_recent")
    with torch.no_grad():
        for prompt, imgs, tokens in zip(prompts, images, new):  # greedy, one sample at a time, no cache
            seq = list(prompt)
            for expected in tokens:
                logits = run(model, collate([{"tokens": seq, "images": imgs}]))
                assert int(logits[0, -1].argmax()) == expected
                seq.append(expected)
    # with the gates closed, generation is the language model's
    _, fresh = build()
    lm_only = generate_text(fresh.language_model, [[1, 2, 3], [6, 7, 8]], max_new_tokens=4)
    with_image = fresh.generate([[1, 2, 3], [6, i, 8]], [[], [tiled()]], max_new_tokens=4)
    assert with_image[0] == lm_only[0]
    with pytest.raises(ValueError, match=r"prompt 1: 1 <\|image\|> token\(s\).*but 0 image"):
        model.generate([[1, 2], [i, 3]], [[], []], max_new_tokens=2)
