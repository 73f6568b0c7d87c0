"""open_clip ViT -> VisionEncoder: features equal open_clip's for a 1-tile image, every file layout loads,
positions resize like open_clip, and bad checkpoints fail naming the file and keys."""
import pytest
import torch
from safetensors.torch import save_file

from vision.encoder import VisionEncoder
from vision.open_clip_convert import (CheckpointError, config_from_open_clip, extract_visual,
                                      load_open_clip_visual, read_state_dict)

open_clip = pytest.importorskip("open_clip")

TINY = dict(embed_dim=16, vision_cfg=dict(image_size=28, layers=3, width=32, head_width=8, patch_size=14),
            text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=4, layers=1))
LAYERS = [0, 1]  # intermediate layers of the tiny config


def _clip(quick_gelu=False, seed=0):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY, quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in model.visual.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.3)
    return model


def _config(quick_gelu=False, **overrides):
    return config_from_open_clip(dict(TINY, quick_gelu=quick_gelu), intermediate_layers=LAYERS,
                                 n_global_layers=1, **overrides)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_converted_features_equal_open_clip(tmp_path, quick_gelu):
    model = _clip(quick_gelu)
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    config = _config(quick_gelu)
    assert (config.qkv_bias, config.out_bias, config.clip_embed_dim, config.n_heads, config.mlp_dim) == \
        (True, True, 16, 4, 128)
    encoder = load_open_clip_visual(tmp_path / "open_clip_pytorch_model.bin", config).eval()
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        ref = model.visual.forward_intermediates(images, indices=LAYERS + [2], output_fmt="NLC",
                                                 output_extra_tokens=True)
        blocks = [torch.cat([cls, patches], dim=1)
                  for cls, patches in zip(ref["image_intermediates_prefix"], ref["image_intermediates"])]
        ours = encoder.forward_single_tile(images)
        pooled = model.encode_image(images)
        # the tiled forward of a 1-tile image (fresh gates, no padding) gives the same features
        tiled = encoder(images[:, None, None], torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, 1))[:, 0, 0]
    for ours_block, theirs in zip(ours.intermediates, blocks[:2]):
        assert (ours_block - theirs).abs().max() <= 1e-4
    final = model.visual.ln_post(blocks[2])
    assert (ours.hidden - final).abs().max() <= 1e-4
    assert (ours.pooled - pooled).abs().max() <= 1e-4
    assert (encoder.forward_clip(images) - pooled).abs().max() <= 1e-4
    assert (tiled[..., :32] - final).abs().max() <= 1e-4
    interleaved = torch.stack(blocks[:2], dim=-1).flatten(-2)  # Mllama's layout: channel-major
    assert (tiled[..., 32:] - interleaved).abs().max() <= 1e-4


def test_every_file_layout_loads_the_same_weights(tmp_path):
    model = _clip()
    full = model.state_dict()
    visual = model.visual.state_dict()
    paths = {
        "full.bin": lambda p: torch.save(full, p),
        "visual.pt": lambda p: torch.save(visual, p),
        "full.safetensors": lambda p: save_file({k: v.contiguous() for k, v in full.items()}, str(p)),
        "train.pt": lambda p: torch.save({"epoch": 3, "name": "run",
                                          "state_dict": {f"module.{k}": v for k, v in full.items()}}, p),
    }
    loaded = []
    for name, write in paths.items():
        write(tmp_path / name)
        loaded.append(load_open_clip_visual(tmp_path / name, _config()).state_dict())
    converted = {k for k in loaded[0] if not k.startswith(("global_transformer.", "pre_tile", "post_tile"))
                 and "gated_positional_embedding.tile" not in k and k != "gated_positional_embedding.gate"}
    for other in loaded[1:]:
        assert all(torch.equal(loaded[0][k], other[k]) for k in converted)
    assert torch.equal(loaded[0]["transformer.layers.1.self_attn.k_proj.weight"],
                       visual["transformer.resblocks.1.attn.in_proj_weight"][32:64])
    assert torch.equal(loaded[0]["clip_projection.weight"], visual["proj"].t())
    without_projection = load_open_clip_visual(tmp_path / "full.bin", _config(clip_embed_dim=None))
    assert not hasattr(without_projection, "clip_projection")


def test_positions_resize_like_open_clip(tmp_path):
    model = _clip()
    torch.save(model.state_dict(), tmp_path / "m.bin")
    encoder = load_open_clip_visual(tmp_path / "m.bin", _config(image_size=56))  # grid 2x2 -> 4x4
    state = {"visual.positional_embedding": model.visual.positional_embedding.detach().clone()}
    bigger = open_clip.model.CLIP(**dict(TINY, vision_cfg=dict(TINY["vision_cfg"], image_size=56)))
    open_clip.model.resize_pos_embed(state, bigger)
    assert encoder.gated_positional_embedding.embedding.shape == (17, 32)
    assert torch.allclose(encoder.gated_positional_embedding.embedding, state["visual.positional_embedding"],
                          atol=1e-6)
    with pytest.raises(CheckpointError, match="resize_positions=True"):
        load_open_clip_visual(tmp_path / "m.bin", _config(image_size=56), resize_positions=False)


def test_bad_checkpoints_name_the_file_and_keys(tmp_path):
    visual = _clip().visual.state_dict()
    path = tmp_path / "m.bin"

    def load_with(state, **config):
        torch.save(state, path)
        return load_open_clip_visual(path, _config(**config))

    with pytest.raises(CheckpointError, match=r"m\.bin: missing open_clip keys \['transformer.resblocks.1.ln_2.bias'\]"):
        load_with({k: v for k, v in visual.items() if k != "transformer.resblocks.1.ln_2.bias"})
    with pytest.raises(CheckpointError, match=r"m\.bin: unexpected .*'transformer.resblocks.0.ls_1.gamma'"):
        load_with(dict(visual, **{"transformer.resblocks.0.ls_1.gamma": torch.ones(32)}))
    with pytest.raises(CheckpointError, match="qkv_bias=True"):
        load_with(visual, qkv_bias=False)
    with pytest.raises(CheckpointError, match="3 transformer blocks, the config n_layers=4"):
        load_with(visual, n_layers=4)
    with pytest.raises(CheckpointError, match=r"'transformer.layers.0.mlp.fc1.weight' needs shape \(64, 32\)"):
        load_with(visual, mlp_dim=64)
    with pytest.raises(CheckpointError, match="no open_clip ViT image tower"):
        load_with({k: v for k, v in _clip().state_dict().items() if not k.startswith("visual.")})
    with pytest.raises(CheckpointError, match=r"missing.bin: checkpoint file not found"):
        read_state_dict(tmp_path / "missing.bin")
    for name in ("corrupt.bin", "corrupt.safetensors"):
        (tmp_path / name).write_bytes(b"not a checkpoint" * 10)
        with pytest.raises(CheckpointError, match=f"{name}: cannot read checkpoint"):
            read_state_dict(tmp_path / name)
    (tmp_path / "m.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint format '.npz'"):
        read_state_dict(tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match="timm image tower"):
        extract_visual({"visual.trunk.patch_embed.proj.weight": torch.ones(1)}, "x.bin")


def test_vit_h_14_config_from_open_clip():
    model_cfg = open_clip.get_model_config("ViT-H-14")
    config = config_from_open_clip(model_cfg, image_size=336)  # paper: CLIP at 224, tiles of 336
    assert (config.width, config.n_layers, config.n_heads, config.mlp_dim, config.clip_embed_dim) == \
        (1280, 32, 16, 5120, 1024)
    assert config.output_dim == 7680 and config.n_global_layers == 8
    with torch.device("meta"):
        n = VisionEncoder(config).num_parameters()
    assert 0.80e9 < n < 0.83e9, n
    with pytest.raises(ValueError, match="ls_init_value"):
        config_from_open_clip({"vision_cfg": dict(model_cfg["vision_cfg"], ls_init_value=1e-5)})
