"""Image encoder (tile-aware ViT, Mllama layout), image loading and tiling, procedural scenes, image
datasets and VQA metrics (see docs/ARCHITECTURE.md)."""
from .config import VisionConfig, preset
from .encoder import VisionEncoder

__all__ = ["VisionConfig", "VisionEncoder", "preset"]
