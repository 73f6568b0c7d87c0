"""The multimodal composition around a frozen language model (see docs/ARCHITECTURE.md): one composed model
(`MultimodalModel`: images through gated cross-attention, speech as token-rate embeddings), its special tokens,
the placement of cross-attention blocks, the model folder, the HF Mllama import and the freezing policy."""
from .freezing import FreezePolicy, stage_policy
from .image_tokens import ImageTextCollator
from .mllama_checkpoint import load_mllama
from .model_folder import LoadedModel, ModelFolderError, compose, load_model, save_model
from .multimodal import ImageInputs, MediaError, MultimodalModel, SpeechInputs
from .multimodal_config import ImageModality, MultimodalConfig, SpeechModality
from .special_tokens import SpecialTokens

__all__ = ["FreezePolicy", "ImageInputs", "ImageModality", "ImageTextCollator", "LoadedModel", "MediaError",
           "ModelFolderError", "MultimodalConfig", "MultimodalModel", "SpecialTokens", "SpeechInputs",
           "SpeechModality", "compose", "load_mllama", "load_model", "save_model", "stage_policy"]
