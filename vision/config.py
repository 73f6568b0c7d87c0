"""Image encoder configuration (paper Sec 7.2: ViT-H/14 + multi-layer features + gated global layers) and presets.

Layer indices are 0-based block indices, the convention of both `transformers` Mllama
(`intermediate_layers_indices` picks from the tuple of block outputs, which does not include the
embedding) and open_clip's `forward_intermediates(indices=...)`: index 3 is the output of the 4th block.
So the paper's layers 4, 8, 16, 24 and 31 are `intermediate_layers=[3, 7, 15, 23, 30]`.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Literal, Optional

ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass
class VisionConfig:
    """Shape of the tile-aware ViT. Derived sizes: `grid_size`, `n_patches`, `seq_len`, `head_dim`, `output_dim`."""
    image_size: int = field(default=448, metadata={"range": (1, None), "help": "tile side in pixels (square tiles)"})
    patch_size: int = field(default=14, metadata={"range": (1, None), "help": "patch side in pixels"})
    num_channels: int = field(default=3, metadata={"range": (1, None), "help": "input colour channels"})
    width: int = field(default=1280, metadata={"range": (1, None), "help": "residual width"})
    n_layers: int = field(default=32, metadata={"range": (1, None), "help": "local (CLIP) transformer blocks"})
    n_heads: int = field(default=16, metadata={"range": (1, None), "help": "attention heads"})
    mlp_dim: int = field(default=5120, metadata={"range": (1, None), "help": "MLP hidden width"})
    n_global_layers: int = field(default=8, metadata={"range": (0, None), "help": "extra gated global blocks"})
    intermediate_layers: list[int] = field(
        default_factory=lambda: [3, 7, 15, 23, 30],
        metadata={"help": "0-based local blocks whose outputs join the final features (paper: 4, 8, 16, 24, 31)"})
    max_num_tiles: int = field(default=4, metadata={"range": (1, None), "help": "tiles per image"})
    max_aspect_ratio_id: int = field(default=8, metadata={
        "range": (0, None), "help": "number of supported tile layouts; ids 1..this, 0 = padding image"})
    norm_eps: float = field(default=1e-5, metadata={"range": (0.0, 1.0), "help": "LayerNorm epsilon"})
    qkv_bias: bool = field(default=False, metadata={"help": "biases on q/k/v (open_clip: yes, Mllama: no)"})
    out_bias: bool = field(default=False, metadata={"help": "bias on the attention output projection"})
    activation: Literal["gelu", "quick_gelu"] = field(default="gelu", metadata={"help": "MLP activation"})
    patch_padding_multiple: int = field(default=8, metadata={
        "range": (1, None), "help": "pad each tile's tokens to a multiple of this (Mllama: 8; 1 = no padding)"})
    global_gate_init: float = field(default=0.0, metadata={
        "help": "initial value of the global blocks' tanh gates (0: a fresh global block is the identity)"})
    clip_embed_dim: Optional[int] = field(default=None, metadata={
        "range": (1, None), "help": "CLIP projection width for contrastive pre-training; null = no projection"})

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.n_heads:
            raise ValueError(f"width {self.width} is not divisible by n_heads {self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation '{self.activation}' is not one of {ACTIVATIONS}")
        self.intermediate_layers = list(self.intermediate_layers)
        bad = [i for i in self.intermediate_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"intermediate_layers {bad} are outside the {self.n_layers} local layers "
                             f"(0-based: 0..{self.n_layers - 1})")

    @property
    def grid_size(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        """Patches per tile (without the class token)."""
        return self.grid_size ** 2

    @property
    def seq_len(self) -> int:
        """Tokens per tile: patches + class token."""
        return self.n_patches + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def output_dim(self) -> int:
        """Width of each output token: final features + one width per intermediate layer."""
        return self.width * (len(self.intermediate_layers) + 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VisionConfig keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_mllama(cls, hf_config: dict, **overrides) -> "VisionConfig":
        """Map the vision part of an HF Mllama / Llama 3.2 Vision `config.json` onto this config.

        `hf_config` is either the whole config.json (its `vision_config` is used) or that vision part.
        Missing keys take transformers' `MllamaVisionConfig` defaults. Mllama has no attention biases
        and pads every tile to a multiple of 8 tokens. (Mllama's `layernorm_pre/post` always use eps
        1e-5 while we use `norm_eps` for every LayerNorm: all released checkpoints have norm_eps 1e-5.)
        """
        vision = hf_config.get("vision_config", hf_config)
        if not isinstance(vision, dict):
            raise ValueError(f"Mllama vision_config must be a mapping, got {type(vision).__name__}")
        act = vision.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"Mllama vision hidden_act '{act}' is not supported (one of {ACTIVATIONS})")
        image_size = _square(vision.get("image_size", 448), "image_size")
        patch_size = _square(vision.get("patch_size", 14), "patch_size")
        ratios = vision.get("supported_aspect_ratios") or [[1, 1], [1, 2], [1, 3], [1, 4],
                                                           [2, 1], [2, 2], [3, 1], [4, 1]]
        fields = dict(
            image_size=image_size, patch_size=patch_size,
            num_channels=vision.get("num_channels", 3),
            width=vision.get("hidden_size", 1280),
            n_layers=vision.get("num_hidden_layers", 32),
            n_heads=vision.get("attention_heads", vision.get("num_attention_heads", 16)),
            mlp_dim=vision.get("intermediate_size", 5120),
            n_global_layers=vision.get("num_global_layers", 8),
            intermediate_layers=list(vision.get("intermediate_layers_indices") or [3, 7, 15, 23, 30]),
            max_num_tiles=vision.get("max_num_tiles", 4),
            max_aspect_ratio_id=len(ratios),
            norm_eps=vision.get("norm_eps", 1e-5),
            qkv_bias=False, out_bias=False, activation=act, patch_padding_multiple=8, clip_embed_dim=None,
        )
        fields.update(overrides)
        config = cls(**fields)
        declared = vision.get("vision_output_dim")
        if declared is not None and declared != config.output_dim:
            raise ValueError(f"Mllama vision_output_dim {declared} != hidden_size x (intermediate layers + 1) "
                             f"= {config.output_dim}")
        return config

    def to_mllama(self) -> dict:
        """The equivalent `MllamaVisionConfig` keyword arguments (for reference models in tests)."""
        if self.qkv_bias or self.out_bias or self.patch_padding_multiple != 8 or self.clip_embed_dim:
            raise ValueError("Mllama has no attention biases, pads to 8 and has no CLIP projection")
        return dict(image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
                    hidden_size=self.width, num_hidden_layers=self.n_layers, attention_heads=self.n_heads,
                    intermediate_size=self.mlp_dim, num_global_layers=self.n_global_layers,
                    intermediate_layers_indices=list(self.intermediate_layers), max_num_tiles=self.max_num_tiles,
                    norm_eps=self.norm_eps, hidden_act=self.activation, vision_output_dim=self.output_dim)


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"Mllama {name} {value} is not square; only square tiles are supported")
        value = value[0]
    return int(value)


_VIT_H_14 = dict(patch_size=14, width=1280, n_layers=32, n_heads=16, mlp_dim=5120, n_global_layers=8,
                 intermediate_layers=[3, 7, 15, 23, 30], max_num_tiles=4, max_aspect_ratio_id=8)

PRESETS: dict[str, dict] = {
    # Paper Sec 7.2: ViT-H/14 with 8 gated global layers, tiles of 336 (4 at most).
    "vit-h-14": dict(_VIT_H_14, image_size=336),
    # Llama 3.2 11B/90B Vision (transformers Mllama): the same encoder with tiles of 560.
    "llama3.2-vision": dict(_VIT_H_14, image_size=560),
    # A small encoder for CPU runs (quickstart-sized) and the tiny one for tests.
    "small": dict(image_size=112, patch_size=14, width=128, n_layers=4, n_heads=4, mlp_dim=512, n_global_layers=1,
                  intermediate_layers=[1, 3], max_num_tiles=4, max_aspect_ratio_id=8),
    "tiny": dict(image_size=28, patch_size=14, width=32, n_layers=4, n_heads=4, mlp_dim=64, n_global_layers=2,
                 intermediate_layers=[1, 3], max_num_tiles=4, max_aspect_ratio_id=8),
}


def preset(name: str, **overrides) -> VisionConfig:
    """Config of a named preset, with field overrides. Unknown name -> error listing the presets."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown vision preset '{name}'{hint}; known presets: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update(overrides)
    return VisionConfig(**fields)
