"""GGUF files (llama.cpp): the config comes from the `llama.*` metadata, tensors are dequantized to
float32 with the `gguf` package, llama.cpp names map to Hugging Face's, and Q/K rows go back from
llama.cpp's interleaved-pair RoPE layout to the half-split layout. Llama 3.1 RoPE scaling, which
llama.cpp stores as a `rope_freqs.weight` tensor of per-frequency divisors, becomes `RopeScaling`.
"""
from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch

from ..config import LlamaConfig, RopeScaling
from ..rope import rope_inv_freq
from .errors import CheckpointError
from .hf import Contents, Entry, NameMap
from .meta import interleaved_to_half_split

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_NAMES = NameMap(_GLOBAL_NAMES, _LAYER, _LAYER_NAMES, q_part="attn_q", k_part="attn_k")
_ROPE_FREQS = "rope_freqs.weight"
_MISSING = object()


def read_gguf(path) -> Contents:
    """A llama-architecture GGUF file: config and tensor list (each dequantized to float32 when read)."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as GGUF ({e})") from e
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(reader, tensors, path)
    entries = {}
    for name, t in tensors.items():
        if name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        target, heads = _NAMES.to_hf(name, config)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-varying dimension first
        entries[target] = Entry(shape, f"{path} [{name}, {t.tensor_type.name}]", partial(_read, path, t, heads))
    return Contents(config, entries, str(path))


def config_from_gguf(reader: gguf.GGUFReader, tensors: dict, path: Path) -> LlamaConfig:
    """LlamaConfig from the `llama.*` metadata; vocab size from the token list, tied when `output.weight`
    is absent."""
    def field(key, default=_MISSING):
        f = reader.fields.get(key)
        if f is None:
            if default is _MISSING:
                raise CheckpointError(f"{path}: metadata key '{key}' is missing")
            return default
        return f.contents()

    arch = field("general.architecture", None)
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture is '{arch}'; only 'llama' GGUF files are supported")
    dim, n_heads = int(field("llama.embedding_length")), int(field("llama.attention.head_count"))
    n_kv_heads = field("llama.attention.head_count_kv", n_heads)
    if isinstance(n_kv_heads, list):
        raise CheckpointError(f"{path}: per-layer llama.attention.head_count_kv is not supported")
    head_dim = int(field("llama.attention.key_length", dim // n_heads))
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if int(field(key, head_dim)) != head_dim:
            raise CheckpointError(f"{path}: {key} = {field(key)} differs from the head size {head_dim}; unsupported")
    scaling_type = field("llama.rope.scaling.type", "none")
    if scaling_type not in ("none", ""):
        raise CheckpointError(f"{path}: llama.rope.scaling.type '{scaling_type}' is not supported")
    theta = float(field("llama.rope.freq_base", 10000.0))
    if "tokenizer.ggml.tokens" in reader.fields:
        vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
    else:
        vocab_size = int(field("llama.vocab_size", 0)) or int(tensors["token_embd.weight"].shape[1])
    scaling = None
    if _ROPE_FREQS in tensors:
        scaling = _scaling_from_rope_freqs(_dequantize(path, tensors[_ROPE_FREQS]), head_dim, theta, path)
    eps = float(field("llama.attention.layer_norm_rms_epsilon", 1e-5))
    try:
        return LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=int(field("llama.block_count")), n_heads=n_heads,
                           n_kv_heads=int(n_kv_heads), ffn_dim=int(field("llama.feed_forward_length")),
                           norm_eps=float(f"{eps:.7g}"),  # stored as float32: 1e-5 reads 9.9999997e-06
                           rope_theta=theta, rope_scaling=scaling,
                           max_seq_len=int(field("llama.context_length", 2048)),
                           tie_embeddings="output.weight" not in tensors, head_dim=head_dim)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _scaling_from_rope_freqs(divisors: np.ndarray, head_dim: int, theta: float, path: Path):
    """Recover Llama 3.1 `RopeScaling` from llama.cpp's per-frequency divisors, and check it reproduces them.

    The divisor is 1 for short wavelengths, `factor` for long ones and 1 / ((1 - s) / factor + s) in
    between, with s linear in 1 / wavelength; with low_freq_factor fixed to 1, two in-between points
    give high_freq_factor and original_max_position (else Llama 3.1's 4 and 8192 are tried)."""
    divisors = divisors.astype(np.float64).reshape(-1)
    factor = float(divisors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    between = (divisors > 1.0 + 1e-4) & (divisors < factor * (1.0 - 1e-4))
    low, high, original = 1.0, 4.0, 8192
    if between.sum() >= 2:
        smooth = (1.0 / divisors[between] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(inv_freq[between] / (2 * math.pi), smooth, 1)
        if intercept < 0:  # s = (original / wavelength - 1) / (high - 1)
            high, original = round(1.0 - 1.0 / intercept, 6), -slope / intercept
            original = round(original) if abs(original - round(original)) < 1e-3 * original else original
    scaling = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position=original)
    ours = inv_freq.astype(np.float32) / rope_inv_freq(head_dim, theta, scaling).numpy()
    if divisors.shape != ours.shape or not np.allclose(ours, divisors, rtol=1e-4):
        raise CheckpointError(f"{path}: {_ROPE_FREQS} does not follow Llama 3.1 RoPE scaling; unsupported")
    return scaling


def _dequantize(path: Path, t) -> np.ndarray:
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor '{t.name}' is stored as {t.tensor_type.name}, which the gguf "
                              f"package cannot dequantize; convert the file to another type (e.g. Q8_0, Q4_K)") from e
    w = np.ascontiguousarray(w, dtype=np.float32)
    return w if w.flags.writeable else w.copy()  # F32 data is a read-only view of the memory-mapped file


def _read(path: Path, t, heads: int) -> torch.Tensor:
    w = torch.from_numpy(_dequantize(path, t))
    return interleaved_to_half_split(w, heads) if heads else w
