"""The multimodal composition around a frozen language model (see docs/ARCHITECTURE.md): gated cross-attention
image adapters, the composed VisionLanguageModel (HF Mllama import), the speech adapter and the freezing
policy per training stage."""
from .freezing import FreezePolicy, stage_policy
from .image_tokens import ImageTextCollator
from .mllama_checkpoint import load_mllama
from .vision_language import VisionLanguageConfig, VisionLanguageModel

__all__ = ["FreezePolicy", "ImageTextCollator", "VisionLanguageConfig", "VisionLanguageModel", "load_mllama",
           "stage_policy"]
