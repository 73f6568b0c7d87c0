"""The composed model with an image modality around a frozen tiny Llama: exact equality with the LM while the gates
are closed, exact zero for tokens that see no image, freezing and gradients, ZeRO-3's always-run mode, the summed
loss at labelled positions, and generation with cached image keys/values."""
import pytest
import torch
import torch.nn.functional as F

from adapters.image_tokens import IGNORE_INDEX, ImageBatchError, ImageTextCollator
from adapters.multimodal import ImageInputs, MediaError, MultimodalModel
from adapters.multimodal_config import ImageModality, MultimodalConfig
from adapters.special_tokens import SpecialTokens
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
    image = ImageModality(vision=vision_preset("tiny", n_layers=2, n_global_layers=1, intermediate_layers=[0, 1]),
                          cross_attention_every=2, **kw)
    config = MultimodalConfig(language=lm.config, image=image,
                              special_tokens=SpecialTokens.after_vocab(VOCAB, image=image_token))
    return lm, MultimodalModel(config, language_model=lm)


def open_gates(model, value=0.8):
    with torch.no_grad():
        for block in model.cross_attention_layers:
            block.cross_attn_attn_gate.fill_(value)
            block.cross_attn_mlp_gate.fill_(-value)


def mixed_batch(image_token=HF_IMAGE):
    i = image_token
    samples = [  # labels: which tokens are targets (the collator shifts them and drops <|image|>)
        {"tokens": [i, 1, 2, 3, i, 4, 5, 6], "labels": [i, 1, 2, -100, i, 4, 5, 6],
         "images": [tiled((1, 2), 1), tiled((2, 2), 2)]},  # 2 images
        {"tokens": [7, 8, 9, 10, 11], "labels": [-100, 8, -100, 10, 11]},  # text only
        {"tokens": [1, 2, 3, i, 12, 13], "labels": [1, 2, 3, i, 12, -100],
         "images": [tiled((1, 1), 3)]},  # text before the image
    ]
    return ImageTextCollator(image_token_id=i, tiling=TilingConfig(tile_size=28, max_tiles=4, max_images=2))(samples)


def run(model, batch, **kw):
    return model(batch["tokens"], images=ImageInputs.from_batch(batch), **kw)


def test_state_dict_keeps_the_language_model_names():
    lm, model = build()
    names = set(model.state_dict())
    assert {f"language_model.{n}" for n in lm.state_dict()} <= names
    assert {"multi_modal_projector.weight", "extra_token_embeddings.weight",
            "cross_attention_layers.1.cross_attn.q_norm.weight", "vision_model.class_embedding"} <= names
    assert model.config.image.positions(4) == [1, 3] and model.plan.positions["image"] == [1, 3]
    assert model.tokens.image == HF_IMAGE
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
    # run_encoder=False skips them (generation's decode steps), with the same logits
    with torch.no_grad():
        assert torch.equal(model(tokens, run_encoder=False), out)


def test_loss_sum_equals_the_cross_entropy_of_the_full_logits():
    _, model = build()
    open_gates(model)
    batch = mixed_batch()
    labels = batch["labels"]
    images = ImageInputs.from_batch(batch)
    loss, count = model.loss_sum(batch["tokens"], labels, images=images)
    logits = model(batch["tokens"], images=images)
    ref = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    assert int(count) == int((labels != IGNORE_INDEX).sum()) and loss.dtype == torch.float32
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)  # the LM head at labelled positions only: same sums
    loss.backward()
    assert model.multi_modal_projector.weight.grad.abs().sum() > 0
    assert ImageInputs.from_batch(mixed_batch()) is not None
    assert ImageInputs.from_batch({"tokens": batch["tokens"][1:2], "pixel_values": None}) is None


def test_image_inputs_errors():
    _, model = build()
    batch = mixed_batch()
    images = ImageInputs.from_batch(batch)
    with pytest.raises(MediaError, match="need a cross_attention_mask"):
        model(batch["tokens"], images=ImageInputs(None, images.pixel_values, images.aspect_ratio_ids,
                                                  images.aspect_ratio_mask))
    with pytest.raises(MediaError, match="does not fit"):
        model(batch["tokens"], images=ImageInputs(images.cross_attention_mask[:, :3], images.pixel_values,
                                                  images.aspect_ratio_ids, images.aspect_ratio_mask))
    with pytest.raises(MediaError, match="need pixel_values"):
        model(batch["tokens"], images=ImageInputs(images.cross_attention_mask))
    with pytest.raises(MediaError, match="no images were given"):
        model(batch["tokens"])


def test_generation_with_cached_image_keys_equals_full_recompute():
    _, model = build(token_policy="most_recent")
    open_gates(model, 2.0)
    i = HF_IMAGE
    prompts = [[1, 2, i, 3, 4, i, 5], [6, 7, 8], [9, i, 10, 11]]
    images = [[tiled((1, 2), 1), tiled((1, 1), 2)], [], [tiled((2, 2), 3)]]
    model.train()
    new = model.generate(prompts, images=images, max_new_tokens=6)
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
    with_image = fresh.generate([[1, 2, 3], [6, i, 8]], images=[[], [tiled()]], max_new_tokens=4)
    assert with_image[0] == lm_only[0]
    assert fresh.generate([[1, 2, 3], [6, 7, 8]], max_new_tokens=4) == lm_only  # no images at all
    with pytest.raises(ImageBatchError, match=r"prompt 1: 1 <\|image\|> token\(s\).*but 0 image"):
        model.generate([[1, 2], [i, 3]], images=[[], []], max_new_tokens=2)
    with pytest.raises(MediaError, match=r"prompt 1 holds 1 <\|image\|> token\(s\) but no images were given"):
        model.generate([[1, 2], [i, 3]], max_new_tokens=2)
