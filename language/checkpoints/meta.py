"""Meta's original Llama checkpoints: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank.

Meta names (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...) map to Hugging Face's; the
ranks are concatenated along the dimension fairscale split (column-parallel weights along rows,
row-parallel ones along columns; norms are replicated); Q/K rows go from Meta's interleaved-pair RoPE
layout to the half-split layout, as transformers' `convert_llama_weights_to_hf.py` does.
"""
from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import torch

from ..config import LlamaConfig, RopeScaling
from .errors import CheckpointError
from .hf import Contents, Entry, NameMap

_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_LAYER = re.compile(r"layers\.(\d+)\.([\w.]+)\.weight")
_NAMES = NameMap(_GLOBAL_NAMES, _LAYER, _LAYER_NAMES, q_part="attention.wq", k_part="attention.wk")
# Dimension along which model-parallel ranks hold slices (None: replicated). The embedding is special:
# Llama 3 splits the vocabulary (dim 0), Llama 1/2 split the model dim (dim 1).
_SPLIT_DIM = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1, "feed_forward.w1": 0,
              "feed_forward.w3": 0, "feed_forward.w2": 1, "attention_norm": None, "ffn_norm": None,
              "norm.weight": None, "output.weight": 0}
_IGNORED = {"rope.freqs"}  # Llama 1/2 files carry precomputed RoPE frequencies


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q/K projection rows (n_heads * head_dim, ...) from the interleaved-pair RoPE layout (Meta and
    llama.cpp rotate pairs (2i, 2i+1)) to the half-split layout (pairs (i, i + head_dim/2), as HF)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_ffn_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU width of Meta's FeedForward: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def config_from_params(params: dict, vocab_size: int, tied: bool, origin: str) -> LlamaConfig:
    """LlamaConfig from Meta's params.json. `use_scaled_rope` means Llama 3.1 scaling (factor 8, or
    params' `rope_scaling_factor`; note HF uses 32 for Llama 3.2 1B/3B, which params.json does not say)."""
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or 8.0), low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position=8192)
        return LlamaConfig(
            vocab_size=vocab_size, dim=dim, n_layers=int(params["n_layers"]), n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            ffn_dim=meta_ffn_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
            norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling, max_seq_len=int(params.get("max_seq_len") or (131072 if scaling else 8192)),
            tie_embeddings=tied)
    except KeyError as e:
        raise CheckpointError(f"{origin}: lacks the key {e}") from e
    except ValueError as e:
        raise CheckpointError(f"{origin}: {e}") from e


def read_meta(path) -> Contents:
    """A Meta folder (params.json + consolidated.*.pth, several model-parallel ranks allowed): config and
    tensor list (Hugging Face names; ranks merged and Q/K rows permuted when read)."""
    folder = Path(path)
    params_path = folder / "params.json"
    try:
        params = json.loads(params_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{params_path}: cannot read ({e})") from e
    params = params.get("model", params)
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: no consolidated.*.pth files next to params.json")
    ranks = [_load_rank(f) for f in files]
    for file, rank in zip(files[1:], ranks[1:]):
        if rank.keys() != ranks[0].keys():
            diff = sorted(rank.keys() ^ ranks[0].keys())
            raise CheckpointError(f"{file}: holds other tensors than {files[0].name}: {diff[:5]}")

    dim = int(params.get("dim", 0))
    origin = str(files[0]) if len(files) == 1 else f"{folder}/consolidated.*.pth ({len(files)} ranks)"
    merged = {name: _merged_entry(name, [r[name] for r in ranks], dim, origin)
              for name in ranks[0] if name not in _IGNORED}
    vocab_size = params.get("vocab_size") or -1
    if vocab_size <= 0 and "tok_embeddings.weight" in merged:  # Llama 1/2 write -1
        vocab_size = merged["tok_embeddings.weight"].shape[0]
    config = config_from_params(params, vocab_size, "output.weight" not in merged, str(params_path))

    entries = {}
    for name, entry in merged.items():
        target, heads = _NAMES.to_hf(name, config)
        if heads:
            entry = entry._replace(load=partial(_permuted, entry.load, heads))
        entries[target] = entry
    return Contents(config, entries, str(folder))


def _load_rank(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot load ({e}); is the file truncated or not a torch checkpoint?") from e


def _merged_entry(name: str, pieces: list[torch.Tensor], dim: int, origin: str) -> Entry:
    m = _LAYER.fullmatch(name)
    kind = m.group(2) if m else name
    if len(pieces) == 1 or (kind not in _SPLIT_DIM and kind != "tok_embeddings.weight"):
        split = None  # one rank, or a tensor check_entries will report as unexpected
    elif kind == "tok_embeddings.weight":
        split = 0 if pieces[0].shape[1] == dim else 1
    else:
        split = _SPLIT_DIM[kind]
    if split is None:
        return Entry(tuple(pieces[0].shape), f"{origin} ['{name}']", lambda: pieces[0])
    shape = list(pieces[0].shape)
    shape[split] = sum(p.shape[split] for p in pieces)
    return Entry(tuple(shape), f"{origin} ['{name}']", lambda: torch.cat(pieces, dim=split))


def _permuted(load, n_heads: int) -> torch.Tensor:
    return interleaved_to_half_split(load(), n_heads)
