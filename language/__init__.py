"""The Llama 3 language model: config presets, model, KV cache, checkpoints, tokenizers, chat format,
generation, corpus/packing and text metrics. Imports nothing else of the project."""
from .config import PRESETS, LlamaConfig, RopeScaling, preset
from .kv_cache import KVCache
from .model import Llama

__all__ = ["Llama", "LlamaConfig", "RopeScaling", "KVCache", "PRESETS", "preset"]
