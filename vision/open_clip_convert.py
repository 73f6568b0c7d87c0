"""Load an open_clip ViT image tower (e.g. `ViT-H-14`) from a local file into `VisionEncoder`.

Name mapping (open_clip `visual.*` -> ours):
    conv1                                   -> patch_embedding
    class_embedding                         -> class_embedding
    positional_embedding                    -> gated_positional_embedding.embedding (bicubic-resized when
                                               the tile grid differs, as open_clip's `resize_pos_embed`)
    ln_pre                                  -> layernorm_pre
    transformer.resblocks.N.ln_1            -> transformer.layers.N.input_layernorm
    transformer.resblocks.N.attn.in_proj_*  -> transformer.layers.N.self_attn.{q,k,v}_proj (split in 3)
    transformer.resblocks.N.attn.out_proj   -> transformer.layers.N.self_attn.o_proj
    transformer.resblocks.N.ln_2            -> transformer.layers.N.post_attention_layernorm
    transformer.resblocks.N.mlp.c_fc/c_proj -> transformer.layers.N.mlp.fc1/fc2
    ln_post                                 -> layernorm_post: CLIP's final norm. In the tiled forward it
                                               normalises the local transformer's output before the global layers
    proj (width, embed_dim)                 -> clip_projection.weight (transposed) when config.clip_embed_dim
                                               is set; dropped otherwise (only the contrastive loss uses it)
Left fresh: the tile embeddings (gates 0, so they add nothing yet), the position gate (0: the CLIP position
embedding is used as is) and the global layers (gates `config.global_gate_init`, default 0: identity).
open_clip has q/k/v and output biases: the config needs `qkv_bias=True, out_bias=True`
(`config_from_open_clip` sets them).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F

from .config import VisionConfig
from .encoder import VisionEncoder


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the keys at fault."""


def config_from_open_clip(model_cfg: dict, **overrides) -> VisionConfig:
    """open_clip model config (the JSON of `open_clip/model_configs/<name>.json`, or its `vision_cfg`) ->
    VisionConfig with attention biases, no patch padding and `clip_embed_dim = embed_dim`.
    Tile, global-layer and intermediate-layer fields keep the VisionConfig defaults unless overridden."""
    vision = model_cfg.get("vision_cfg", model_cfg)
    unsupported = {k: vision[k] for k in ("ls_init_value", "attentional_pool", "no_ln_pre", "timm_model_name",
                                          "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                                          "scale_attn", "scale_fc") if vision.get(k)}
    if vision.get("pool_type", "tok") != "tok":
        unsupported["pool_type"] = vision["pool_type"]
    if unsupported:
        raise ValueError(f"open_clip vision settings not supported by VisionEncoder: {unsupported}")
    width = vision.get("width", 768)
    layers = vision.get("layers", 12)
    if not isinstance(layers, int):
        raise ValueError(f"open_clip vision 'layers' {layers} describes a ResNet, not a ViT")
    eps = (vision.get("norm_kwargs") or {}).get("eps", 1e-5)
    fields = dict(image_size=_side(vision.get("image_size", 224), "image_size"),
                  patch_size=_side(vision.get("patch_size", 16), "patch_size"),
                  width=width, n_layers=layers, n_heads=width // vision.get("head_width", 64),
                  mlp_dim=int(width * vision.get("mlp_ratio", 4.0)), norm_eps=eps,
                  qkv_bias=True, out_bias=True, patch_padding_multiple=1,
                  activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
                  clip_embed_dim=model_cfg.get("embed_dim"))
    if "intermediate_layers" not in overrides:
        fields["intermediate_layers"] = [i for i in VisionConfig().intermediate_layers if i < layers]
    fields.update(overrides)
    return VisionConfig(**fields)


def load_open_clip_visual(path: Union[str, Path], config: VisionConfig, resize_positions: bool = True) -> VisionEncoder:
    """A VisionEncoder(config) whose CLIP part comes from the open_clip checkpoint at `path` (.bin / .pt /
    .pth / .safetensors; a full CLIP state dict, a visual-only one or a training checkpoint with
    'state_dict'); everything else freshly initialised."""
    path = Path(path)
    converted = convert_open_clip_visual(extract_visual(read_state_dict(path), path), config,
                                         source=str(path), resize_positions=resize_positions)
    encoder = VisionEncoder(config)
    missing, unexpected = encoder.load_state_dict(converted, strict=False)
    fresh = [k for k in missing if not _is_fresh(k)]
    if fresh or unexpected:  # a bug in the mapping, not in the file
        raise RuntimeError(f"{path}: conversion left {fresh} unset and produced unknown keys {unexpected}")
    return encoder


def read_state_dict(path: Path) -> dict:
    """Tensors of a local checkpoint file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint format '{path.suffix}' "
                                  f"(expected .safetensors, .bin, .pt, .pth or .ckpt)")
    except CheckpointError:
        raise
    except Exception as e:  # torch / pickle / zip / safetensors errors all mean an unreadable file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); "
                              f"TorchScript archives (OpenAI's original .pt) are not supported") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def extract_visual(state: dict, source: Union[str, Path] = "state dict") -> dict:
    """The image tower's tensors without prefixes, from a full CLIP state dict (`visual.*`), a training
    checkpoint (`state_dict`, `module.` prefixes) or a visual-only state dict."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if any(k.startswith("trunk.") for k in state):
        raise CheckpointError(f"{source}: a timm image tower (visual.trunk.*) is not an open_clip ViT")
    if "conv1.weight" not in state:
        raise CheckpointError(f"{source}: no open_clip ViT image tower found (no 'conv1.weight' / "
                              f"'visual.conv1.weight'; first keys: {sorted(state)[:8]})")
    return state


def convert_open_clip_visual(visual: dict, config: VisionConfig, source: str = "state dict",
                             resize_positions: bool = True) -> dict:
    """open_clip visual state dict (no prefix) -> our state dict for the CLIP part (fresh parts absent)."""
    c = config
    if not (c.qkv_bias and c.out_bias):
        raise CheckpointError(f"{source}: open_clip attention has q/k/v and output biases; "
                              f"build the config with qkv_bias=True and out_bias=True")
    remaining = dict(visual)
    out, missing = {}, []

    def take(key):
        if key not in remaining:
            missing.append(key)
            return None
        return remaining.pop(key)

    def put(ours, tensor, shape):
        if tensor is None:
            return
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{source}: '{ours}' needs shape {tuple(shape)}, the checkpoint has "
                                  f"{tuple(tensor.shape)} (check width/patch_size/mlp_dim of the config)")
        out[ours] = tensor

    w = c.width
    put("patch_embedding.weight", take("conv1.weight"), (w, c.num_channels, c.patch_size, c.patch_size))
    put("class_embedding", take("class_embedding"), (w,))
    positions = take("positional_embedding")
    if positions is not None and positions.shape[0] != c.seq_len:
        if not resize_positions:
            raise CheckpointError(f"{source}: positional_embedding has {positions.shape[0]} positions, "
                                  f"the config {c.seq_len}; pass resize_positions=True to interpolate")
        positions = resize_position_embedding(positions, c.grid_size, source)
    put("gated_positional_embedding.embedding", positions, (c.seq_len, w))
    for ours, theirs in (("layernorm_pre", "ln_pre"), ("layernorm_post", "ln_post")):
        put(f"{ours}.weight", take(f"{theirs}.weight"), (w,))
        put(f"{ours}.bias", take(f"{theirs}.bias"), (w,))

    n_blocks = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
    if n_blocks != c.n_layers:
        raise CheckpointError(f"{source}: the checkpoint has {n_blocks} transformer blocks, "
                              f"the config n_layers={c.n_layers}")
    for i in range(c.n_layers):
        theirs, ours = f"transformer.resblocks.{i}.", f"transformer.layers.{i}."
        for name_ours, name_theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            put(f"{ours}{name_ours}.weight", take(f"{theirs}{name_theirs}.weight"), (w,))
            put(f"{ours}{name_ours}.bias", take(f"{theirs}{name_theirs}.bias"), (w,))
        in_weight, in_bias = take(f"{theirs}attn.in_proj_weight"), take(f"{theirs}attn.in_proj_bias")
        for tensor, suffix, shape in ((in_weight, "weight", (3 * w, w)), (in_bias, "bias", (3 * w,))):
            if tensor is None:
                continue
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"{source}: '{theirs}attn.in_proj_{suffix}' has shape "
                                      f"{tuple(tensor.shape)}, expected {shape}")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"{ours}self_attn.{proj}.{suffix}"] = part
        put(f"{ours}self_attn.o_proj.weight", take(f"{theirs}attn.out_proj.weight"), (w, w))
        put(f"{ours}self_attn.o_proj.bias", take(f"{theirs}attn.out_proj.bias"), (w,))
        put(f"{ours}mlp.fc1.weight", take(f"{theirs}mlp.c_fc.weight"), (c.mlp_dim, w))
        put(f"{ours}mlp.fc1.bias", take(f"{theirs}mlp.c_fc.bias"), (c.mlp_dim,))
        put(f"{ours}mlp.fc2.weight", take(f"{theirs}mlp.c_proj.weight"), (w, c.mlp_dim))
        put(f"{ours}mlp.fc2.bias", take(f"{theirs}mlp.c_proj.bias"), (w,))

    projection = remaining.pop("proj", None)
    if c.clip_embed_dim is not None:
        if projection is None:
            missing.append("proj")
        else:
            put("clip_projection.weight", projection.t().contiguous(), (c.clip_embed_dim, w))
    if missing:
        raise CheckpointError(f"{source}: missing open_clip keys {missing[:12]}"
                              + (f" and {len(missing) - 12} more" if len(missing) > 12 else ""))
    if remaining:
        raise CheckpointError(f"{source}: unexpected open_clip keys (a feature VisionEncoder does not have, "
                              f"e.g. layer scale or attentional pooling): {sorted(remaining)[:12]}")
    return out


def resize_position_embedding(positions: torch.Tensor, grid_size: int, source: str = "state dict") -> torch.Tensor:
    """(1 + g*g, width) -> (1 + grid_size**2, width): class position kept, the grid resized bicubically
    with antialiasing (open_clip's `resize_pos_embed`)."""
    old_grid = math.isqrt(positions.shape[0] - 1)
    if old_grid * old_grid != positions.shape[0] - 1:
        raise CheckpointError(f"{source}: positional_embedding of {positions.shape[0]} rows is not "
                              f"1 class position + a square grid")
    cls, grid = positions[:1], positions[1:]
    grid = grid.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size * grid_size, -1).to(positions.dtype)
    return torch.cat([cls, grid], dim=0)


def _is_fresh(key: str) -> bool:
    """Parameters an open_clip checkpoint does not have."""
    return (key.startswith(("pre_tile_positional_embedding.", "post_tile_positional_embedding.",
                            "global_transformer."))
            or key in ("gated_positional_embedding.gate", "gated_positional_embedding.tile_embedding.weight"))


def _side(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"open_clip {name} {value} is not square")
        value = value[0]
    return int(value)
