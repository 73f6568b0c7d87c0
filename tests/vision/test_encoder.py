"""The image encoder: presets and sizes, Mllama config mapping, numerical parity with transformers'
MllamaVisionModel (tiles, aspect ratios, masked tiles, padding images), zero gates, checkpointing, bf16."""
import pytest
import torch

from vision.config import VisionConfig, preset
from vision.encoder import VisionEncoder

transformers = pytest.importorskip("transformers")
from transformers import MllamaVisionConfig, MllamaVisionModel  # noqa: E402

# The vision part of Llama-3.2-11B-Vision's config.json (the 90B model has the same encoder).
LLAMA32_VISION_CONFIG = {
    "attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 560,
    "initializer_range": 0.02, "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120,
    "max_num_tiles": 4, "model_type": "mllama_vision_model", "norm_eps": 1e-05, "num_channels": 3,
    "num_global_layers": 8, "num_hidden_layers": 32, "patch_size": 14,
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    "vision_output_dim": 7680,
}


def test_vit_h_14_preset_sizes():
    config = preset("vit-h-14")
    assert (config.width, config.n_layers, config.n_global_layers, config.n_heads, config.mlp_dim) == \
        (1280, 32, 8, 16, 5120)
    assert config.intermediate_layers == [3, 7, 15, 23, 30] and config.output_dim == 7680
    with torch.device("meta"):
        encoder = VisionEncoder(config)
    n = encoder.num_parameters()
    assert 0.80e9 < n < 0.87e9, n                        # 815.07M with tiles of 336 (paper: ~850M)
    clip_part = n - sum(p.numel() for k, p in encoder.named_parameters()
                        if "tile" in k or k.startswith("global_transformer."))
    assert 0.62e9 < clip_part < 0.64e9                   # the ViT-H/14 itself (paper: 630M)


def test_llama32_vision_matches_mllama_names_shapes_and_size():
    config = VisionConfig.from_mllama({"model_type": "mllama", "vision_config": LLAMA32_VISION_CONFIG})
    assert config == preset("llama3.2-vision")
    with torch.device("meta"):
        ours = VisionEncoder(config)
        theirs = MllamaVisionModel(MllamaVisionConfig(**LLAMA32_VISION_CONFIG))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) == 863_567_379


def test_config_errors_and_round_trip():
    with pytest.raises(ValueError, match="did you mean 'vit-h-14'"):
        preset("vit-h14")
    with pytest.raises(ValueError, match=r"intermediate_layers \[4\]"):
        preset("tiny", intermediate_layers=[1, 4])
    with pytest.raises(ValueError, match="vision_output_dim 1000"):
        VisionConfig.from_mllama(dict(LLAMA32_VISION_CONFIG, vision_output_dim=1000))
    with pytest.raises(ValueError, match="not square"):
        VisionConfig.from_mllama(dict(LLAMA32_VISION_CONFIG, image_size=[560, 448]))
    config = preset("tiny", image_size=42)
    assert VisionConfig.from_mllama(MllamaVisionConfig(**config.to_mllama()).to_dict()) == config
    assert VisionConfig.from_dict(config.to_dict()) == config


def _is_gate(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("gate", "gate_attn", "gate_ffn")


def _reference_pair(image_size: int, seed: int = 0):
    """A tiny random MllamaVisionModel with random (non-zero) gates and our encoder with its weights."""
    torch.manual_seed(seed)
    hf_config = MllamaVisionConfig(hidden_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=4,
                                   intermediate_size=64, image_size=image_size, patch_size=14, max_num_tiles=4,
                                   intermediate_layers_indices=[2, 0], vision_output_dim=96)
    reference = MllamaVisionModel(hf_config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if _is_gate(name):
                p.copy_(torch.randn_like(p))
            elif "tile" in name or name.endswith("embedding"):
                p.normal_(std=0.5)
    ours = VisionEncoder(VisionConfig.from_mllama(hf_config.to_dict())).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.mark.parametrize("image_size", [28, 42])
def test_parity_with_mllama_vision_model(image_size):
    reference, ours = _reference_pair(image_size)
    # 2 samples x 3 images x 4 tiles: layouts 1x1, 2x2, 2x1 (ids 1, 6, 5), a padding image (id 0) with
    # its first tile marked real (the HF processor's way) and one with no real tile; random pixels in
    # masked tiles too (real tokens attend to them in Mllama).
    pixels = torch.randn(2, 3, 4, 3, image_size, image_size)
    ids = torch.tensor([[1, 6, 5], [5, 0, 0]])
    mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]],
                         [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]])
    with torch.no_grad():
        expected = reference(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
        got = ours(pixels, ids, mask)
    assert got.shape == expected.shape == (2, 3, 4, (image_size // 14) ** 2 + 1, 96)
    assert (got - expected).abs().max() <= 1e-4


def test_fresh_gates_make_tile_tables_and_global_layers_inert():
    torch.manual_seed(0)
    config = preset("tiny")
    encoder = VisionEncoder(config).eval()
    gates = [p for name, p in encoder.named_parameters() if _is_gate(name)]
    assert len(gates) == 3 + 2 * config.n_global_layers and all(not p.detach().any() for p in gates)
    without_global = VisionEncoder(preset("tiny", n_global_layers=0)).eval()
    without_global.load_state_dict(encoder.state_dict(), strict=False)
    with torch.no_grad():
        for name, p in without_global.named_parameters():
            if "tile" in name and not _is_gate(name):
                p.normal_()                                   # different tile tables: no effect at gate 0
    pixels, ids, mask = torch.randn(2, 1, 4, 3, 28, 28), torch.tensor([[6], [2]]), torch.ones(2, 1, 4)
    with torch.no_grad():
        assert torch.allclose(encoder(pixels, ids, mask), without_global(pixels, ids, mask), atol=1e-6)


def test_one_tile_without_padding_is_the_plain_vit():
    """N_tiles may be below max_num_tiles; with no padding and fresh gates a 1-tile image gives the
    single-tile (CLIP) features: [:width] = layernorm_post(last local block), then the interleaved
    intermediates (index width + c * K + k)."""
    torch.manual_seed(0)
    config = preset("tiny", patch_padding_multiple=1)
    encoder = VisionEncoder(config).eval()
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        tiled = encoder(images[:, None, None], torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, 1))[:, 0, 0]
        single = encoder.forward_single_tile(images)
    w, k = config.width, len(config.intermediate_layers)
    assert torch.allclose(tiled[..., :w], single.hidden, atol=1e-6)
    for j, layer_out in enumerate(single.intermediates):
        assert torch.allclose(tiled[..., w:].reshape(3, config.seq_len, w, k)[..., j], layer_out, atol=1e-6)
    assert single.pooled.shape == (3, w)
    clip = VisionEncoder(preset("tiny", clip_embed_dim=8))
    assert clip.forward_clip(images).shape == (3, 8)


def test_gradient_checkpointing_recomputes_and_keeps_gradients():
    torch.manual_seed(0)
    encoder = VisionEncoder(preset("tiny", global_gate_init=0.5)).train()
    pixels, ids, mask = torch.randn(2, 1, 4, 3, 28, 28), torch.tensor([[6], [3]]), torch.tensor([[[1, 1, 1, 1]], [[1, 1, 1, 0]]])

    def grads():
        encoder.zero_grad()
        encoder(pixels, ids, mask).square().mean().backward()
        return {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    calls = []
    encoder.global_transformer.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    plain = grads()
    encoder.gradient_checkpointing_enable()
    checkpointed = grads()
    assert len(calls) == 1 + 2                                # recomputed in the backward pass
    assert plain.keys() == checkpointed.keys() and "global_transformer.layers.0.gate_attn" in plain
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_bf16_autocast_and_bf16_weights():
    torch.manual_seed(0)
    encoder = VisionEncoder(preset("tiny", global_gate_init=0.5)).eval()
    pixels, ids, mask = torch.randn(2, 2, 4, 3, 28, 28), torch.tensor([[1, 6], [2, 0]]), torch.ones(2, 2, 4)
    mask[1, 1, 1:] = 0
    with torch.no_grad():
        reference = encoder(pixels, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = encoder(pixels, ids, mask)
        half = encoder.to(torch.bfloat16)(pixels, ids, mask)  # float32 pixels are cast to the weights' dtype
    assert half.dtype == torch.bfloat16                    # under autocast the residual stream stays float32
    for out in (autocast, half):
        assert torch.isfinite(out).all()
        assert (out.float() - reference).norm() / reference.norm() < 2e-2


def test_bad_inputs_are_rejected_with_the_expected_shape():
    encoder = VisionEncoder(preset("tiny"))
    ids, mask = torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, 4)
    with pytest.raises(ValueError, match=r"tiles must be \(3, 28, 28\)"):
        encoder(torch.randn(1, 1, 4, 3, 32, 32), ids, mask)
    with pytest.raises(ValueError, match="at most 4"):
        encoder(torch.randn(1, 1, 5, 3, 28, 28), ids, torch.ones(1, 1, 5))
    with pytest.raises(ValueError, match=r"aspect_ratio_ids must lie in \[0, 8\]"):
        encoder(torch.randn(1, 1, 4, 3, 28, 28), torch.full((1, 1), 9), mask)
    with pytest.raises(ValueError, match="aspect_ratio_mask must be"):
        encoder(torch.randn(1, 1, 4, 3, 28, 28), ids, torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\(B, N_img, N_tiles, C, H, W\)"):
        encoder(torch.randn(1, 4, 3, 28, 28), ids, mask)
    with pytest.raises(ValueError, match=r"\(B, 3, 28, 28\)"):
        encoder.forward_clip(torch.randn(1, 3, 42, 42))
