"""The image encoder (paper Sec 7.2): a ViT-H/14 over image tiles with tile-aware position embeddings,
multi-layer features and gated global layers; the same computation and parameter names as
`transformers.MllamaVisionModel`, so a Llama 3.2 Vision checkpoint's `vision_model.*` loads unchanged.

Per image: patchify every tile (conv, no bias) -> + gated pre-tile embedding -> prepend the class token
-> + gated tile position embedding -> LayerNorm -> pad each tile to a multiple of 8 tokens -> local
transformer over the tokens of all tiles of the image (keeping the outputs of the intermediate layers)
-> LayerNorm -> + gated post-tile embedding -> gated global transformer -> unpad -> concatenate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import AspectRatioEmbedding, LayerStack, TilePositionEmbedding, padding_attention_mask


@dataclass
class SingleTileOutput:
    """Features of a plain single-tile forward (no tile embeddings, no padding, no global layers)."""
    hidden: torch.Tensor                 # (B, seq_len, width): last local block, after layernorm_post
    intermediates: list[torch.Tensor]    # each (B, seq_len, width): raw outputs of config.intermediate_layers
    pooled: torch.Tensor                 # (B, clip_embed_dim or width): class token of `hidden`, projected


class VisionEncoder(nn.Module):
    """Tiled images -> per-token features of width `config.output_dim`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(config.num_channels, config.width, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(config.width ** -0.5 * torch.randn(config.width))
        self.gated_positional_embedding = TilePositionEmbedding(config)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(config)
        self.post_tile_positional_embedding = AspectRatioEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.layernorm_post = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.transformer = LayerStack(config, config.n_layers, gated=False)
        self.global_transformer = LayerStack(config, config.n_global_layers, gated=True)
        if config.clip_embed_dim is not None:
            self.clip_projection = nn.Linear(config.width, config.clip_embed_dim, bias=False)

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, N_img, N_tiles, C, H, W) with H = W = image_size and N_tiles <= max_num_tiles,
        aspect_ratio_ids (B, N_img) long in [0, max_aspect_ratio_id] (0 = padding image),
        aspect_ratio_mask (B, N_img, N_tiles) (1/True = real tile)
        -> (B, N_img, N_tiles, seq_len, output_dim), seq_len = patches + 1 (class token first).

        Feature layout (Mllama's): [:width] is the global transformer's output; then the intermediate
        layers interleaved per channel: index width + c * K + k is channel c of intermediate layer k
        (K = len(intermediate_layers)).
        """
        c = self.config
        self._check_inputs(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        b, n_img, n_tiles = pixel_values.shape[:3]
        images = b * n_img
        ids = aspect_ratio_ids.reshape(images)

        x = self._patchify(pixel_values.flatten(0, 2))                                   # (B*N*T, P, width)
        x = x.reshape(images, n_tiles, c.n_patches, c.width)
        x = self.pre_tile_positional_embedding(x, ids)
        cls = self.class_embedding.to(x.dtype).expand(images, n_tiles, 1, c.width)
        x = torch.cat([cls, x], dim=2)                                                   # (B*N, T, S, width)
        x = self.gated_positional_embedding(x, ids)
        x = self.layernorm_pre(x)

        padded_len = -(-c.seq_len // c.patch_padding_multiple) * c.patch_padding_multiple
        x = F.pad(x, (0, 0, 0, padded_len - c.seq_len))                                 # (B*N, T, L, width)
        mask = padding_attention_mask(aspect_ratio_mask.reshape(images, n_tiles).bool(), padded_len,
                                      c.seq_len, self._compute_dtype(x))

        x = x.reshape(images, n_tiles * padded_len, c.width)
        x, intermediates = self.transformer(x, mask, keep=c.intermediate_layers)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.view(images, n_tiles, padded_len, c.width), ids)
        x, _ = self.global_transformer(x.view(images, n_tiles * padded_len, c.width), mask)

        if intermediates:
            x = torch.cat([x, torch.stack(intermediates, dim=-1).flatten(-2)], dim=-1)
        x = x.view(b, n_img, n_tiles, padded_len, c.output_dim)
        return x[:, :, :, :c.seq_len]

    def forward_single_tile(self, pixel_values: torch.Tensor) -> SingleTileOutput:
        """pixel_values (B, C, H, W) -> features of a plain CLIP ViT: the shared position embedding without
        its gate, no tile embeddings, no padding or mask, no global layers (for contrastive pre-training
        and for parity with open_clip)."""
        c = self.config
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"pixel_values must be (B, {c.num_channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(pixel_values.shape)}")
        x = self._patchify(pixel_values)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, c.width)
        x = torch.cat([cls, x], dim=1) + self.gated_positional_embedding.embedding
        x = self.layernorm_pre(x)
        x, intermediates = self.transformer(x, None, keep=c.intermediate_layers)
        hidden = self.layernorm_post(x)
        pooled = hidden[:, 0]
        if c.clip_embed_dim is not None:
            pooled = self.clip_projection(pooled)
        return SingleTileOutput(hidden=hidden, intermediates=intermediates, pooled=pooled)

    def forward_clip(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> pooled image embedding (B, clip_embed_dim or width) for a CLIP loss."""
        return self.forward_single_tile(pixel_values).pooled

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block (local and global) in the backward pass (activation checkpointing)."""
        self.transformer.gradient_checkpointing = True
        self.global_transformer.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.transformer.gradient_checkpointing = False
        self.global_transformer.gradient_checkpointing = False

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, n_patches, width), patches in raster order."""
        weight = self.patch_embedding.weight
        return self.patch_embedding(pixels.to(weight.device, weight.dtype)).flatten(2).transpose(1, 2)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype attention runs in: the autocast dtype when autocast is on, else the activations'."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _check_inputs(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> None:
        c = self.config
        if pixel_values.dim() != 6:
            raise ValueError(f"pixel_values must be (B, N_img, N_tiles, C, H, W), got {tuple(pixel_values.shape)}")
        b, n_img, n_tiles, channels, h, w = pixel_values.shape
        if (channels, h, w) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"tiles must be ({c.num_channels}, {c.image_size}, {c.image_size}), "
                             f"got ({channels}, {h}, {w})")
        if n_tiles > c.max_num_tiles:
            raise ValueError(f"{n_tiles} tiles per image but the encoder supports at most {c.max_num_tiles}")
        if tuple(aspect_ratio_ids.shape) != (b, n_img):
            raise ValueError(f"aspect_ratio_ids must be (B, N_img) = ({b}, {n_img}), "
                             f"got {tuple(aspect_ratio_ids.shape)}")
        if tuple(aspect_ratio_mask.shape) != (b, n_img, n_tiles):
            raise ValueError(f"aspect_ratio_mask must be (B, N_img, N_tiles) = ({b}, {n_img}, {n_tiles}), "
                             f"got {tuple(aspect_ratio_mask.shape)}")
        if aspect_ratio_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"aspect_ratio_ids must be integers, got {aspect_ratio_ids.dtype}")
        if aspect_ratio_ids.numel():
            low, high = int(aspect_ratio_ids.min()), int(aspect_ratio_ids.max())
            if low < 0 or high > c.max_aspect_ratio_id:
                raise ValueError(f"aspect_ratio_ids must lie in [0, {c.max_aspect_ratio_id}], "
                                 f"got values in [{low}, {high}]")
