"""Hugging Face Llama checkpoints: `config.json` + `model.safetensors`, or shards listed in
`model.safetensors.index.json`.

`read_hf` reads the config and lists the tensors (Hugging Face names) without reading their data; `Llama.
from_pretrained` checks names and shapes against the config (`check_entries`, also used for GGUF and Meta files)
and then reads each tensor once into a model built on the meta device, so an 8B model is held in memory once.
`save_hf` writes a folder that `transformers.LlamaForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import json
import re
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import LlamaConfig, RopeScaling
from .errors import CheckpointError

# Tensors some checkpoints carry that the model recomputes (old HF Llama files store RoPE frequencies).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
# transformers' LlamaConfig defaults, used for keys a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                    tie_word_embeddings=False, hidden_act="silu")
_DEFAULT_ROPE_THETA = 10000.0


class Entry(NamedTuple):
    """One checkpoint tensor before it is read: its shape, where it lives (for messages), a reader."""
    shape: tuple
    origin: str
    load: Callable[[], torch.Tensor]


class Contents(NamedTuple):
    """What a checkpoint reader returns: the model config and its tensors (Hugging Face names), not yet read."""
    config: LlamaConfig
    entries: dict[str, Entry]
    source: str  # the file or folder, for messages


# ---------------------------------------------------------------- checks before any tensor is read

def check_entries(contents: Contents, expected: dict[str, tuple]) -> dict[str, Entry]:
    """The entries that fill `expected` (name -> shape of the model's state dict), after checking that names and
    shapes match: missing, unexpected and wrongly shaped tensors are reported before any data is read. A tied
    model needs no `lm_head.weight` (the embedding serves)."""
    entries = contents.entries
    if contents.config.tie_embeddings:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
        entries = {k: v for k, v in entries.items() if k != "lm_head.weight"}
    _check_names(contents.source, expected, [k for k in entries if not _IGNORED.fullmatch(k)])
    for name, shape in expected.items():
        _check_shape(name, entries[name].origin, tuple(entries[name].shape), shape)
    return {name: entries[name] for name in expected}


def read_entry(name: str, entry: Entry, shape: tuple) -> torch.Tensor:
    """Read one tensor and check its shape again (the data may disagree with the header)."""
    tensor = entry.load()
    _check_shape(name, entry.origin, tuple(tensor.shape), shape)
    return tensor


def _check_names(source: str, expected: dict, found: list[str]) -> None:
    found_set = set(found)
    missing = [k for k in expected if k not in found_set]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = [f"{len(v)} {what} tensor(s): {_few(v)}" for what, v in (("missing", missing),
                                                                          ("unexpected", unexpected)) if v]
        raise CheckpointError(f"{source}: checkpoint tensors do not match the config: " + "; ".join(parts))


def _check_shape(name: str, origin: str, found: tuple, expected: tuple) -> None:
    if found != expected:
        raise CheckpointError(f"{origin}: tensor '{name}' has shape {list(found)}, "
                              f"but the config expects {list(expected)}")


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ---------------------------------------------------------------- config.json <-> LlamaConfig

class NameMap(NamedTuple):
    """How a foreign checkpoint names tensors: whole-model names, the per-layer pattern (layer index, part)
    and its parts, and which parts are the Q and K projections (stored in the interleaved RoPE layout)."""
    global_names: dict[str, str]
    layer: re.Pattern
    layer_parts: dict[str, str]
    q_part: str
    k_part: str

    def to_hf(self, name: str, config: LlamaConfig) -> tuple[str, int]:
        """HF name of a tensor and, for Q/K, the head count to un-interleave with (else 0)."""
        if name in self.global_names:
            return self.global_names[name], 0
        m = self.layer.fullmatch(name)
        if m and m.group(2) in self.layer_parts:
            heads = {self.q_part: config.n_heads, self.k_part: config.n_kv_heads}.get(m.group(2), 0)
            return f"model.layers.{m.group(1)}.{self.layer_parts[m.group(2)]}.weight", heads
        return name, 0  # reported as unexpected


def config_from_hf(d: dict, origin: str) -> LlamaConfig:
    """LlamaConfig from an HF `config.json` dict (transformers 4 or 5 spelling of the RoPE keys)."""
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{origin}: model_type '{model_type}' is not supported (only 'llama')")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise CheckpointError(f"{origin}: {key}=true is not supported (this Llama has no biases)")

    def get(key):
        return d[key] if d.get(key) is not None else _HF_DEFAULTS.get(key)

    if get("hidden_act") != "silu":
        raise CheckpointError(f"{origin}: hidden_act '{get('hidden_act')}' is not supported (only 'silu')")
    theta, scaling = _rope_from_hf(d, get("max_position_embeddings"), origin)
    n_heads = get("num_attention_heads")
    try:
        return LlamaConfig(vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
                           n_heads=n_heads, n_kv_heads=get("num_key_value_heads") or n_heads,
                           ffn_dim=get("intermediate_size"), norm_eps=get("rms_norm_eps"), rope_theta=theta,
                           rope_scaling=scaling, max_seq_len=get("max_position_embeddings"),
                           tie_embeddings=bool(get("tie_word_embeddings")), head_dim=get("head_dim"))
    except ValueError as e:
        raise CheckpointError(f"{origin}: {e}") from e


def _rope_from_hf(d: dict, max_positions: int, origin: str):
    # transformers 5 keeps everything in `rope_parameters`; version 4 wrote `rope_theta` + `rope_scaling`.
    # Like transformers 5, a non-empty `rope_scaling` wins over `rope_parameters`.
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = float(rope.get("rope_theta", d.get("rope_theta", _DEFAULT_ROPE_THETA)))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{origin}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"{origin}: RoPE type '{rope_type}' is not supported (only default and 'llama3')")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
    if missing:
        raise CheckpointError(f"{origin}: llama3 RoPE scaling lacks {missing}")
    return theta, RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position=int(rope.get("original_max_position_embeddings", max_positions)))


def config_to_hf(config: LlamaConfig, dtype: torch.dtype) -> dict:
    """An HF `config.json` dict for `config`; the RoPE keys are written in both transformers 4 and 5 spellings."""
    scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position}
    rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "rope_parameters": rope_parameters, "rope_theta": config.rope_theta, "rope_scaling": scaling,
        "dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------- load / save

def read_hf(path, files: ExitStack) -> Contents:
    """An HF Llama folder (config.json + model.safetensors or a sharded index): config and tensor list; the
    safetensors files stay open in `files` until the tensors are read."""
    folder = Path(path)
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read the config ({e})") from e
    config = config_from_hf(raw, str(config_path))
    return Contents(config, safetensors_entries(folder, files), str(folder))


def safetensors_entries(folder: Path, files: ExitStack) -> dict[str, Entry]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        wanted = None
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: cannot read the shard index ({e!r})") from e
        wanted = {}
        for name, file in weight_map.items():
            wanted.setdefault(file, []).append(name)
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {_few(others)}: only safetensors weights are read)" if others else ""
        raise CheckpointError(f"{folder}: neither model.safetensors nor model.safetensors.index.json{hint}")

    entries = {}
    for file, names in ({single.name: None} if wanted is None else wanted).items():
        file = folder / file
        if not file.is_file():
            raise CheckpointError(f"{index}: lists {file.name}, which is not in the folder")
        handle = files.enter_context(_open_safetensors(file))
        present = set(handle.keys())
        for name in names if names is not None else handle.keys():
            if name not in present:
                raise CheckpointError(f"{index}: lists tensor '{name}' in {file.name}, which does not hold it")
            entries[name] = Entry(tuple(handle.get_slice(name).get_shape()), str(file),
                                  partial(_read_tensor, handle, file, name))
    return entries


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise CheckpointError(f"{file}: cannot open as safetensors ({e}); is the file truncated or corrupt?") from e


def _read_tensor(handle, file: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read tensor '{name}' ({e}); is the file truncated or corrupt?") from e


def save_hf(model, path, *, max_shard_size: int | str = "5GB") -> None:
    """Write `model` as an HF folder: config.json and model.safetensors, or numbered shards of at most
    `max_shard_size` (bytes, or "500MB", "5GB", "2GiB") plus model.safetensors.index.json. Earlier
    model*.safetensors files and index in the folder are removed first."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()
               if not (config.tie_embeddings and name == "lm_head.weight")}
    dtype = tensors["model.embed_tokens.weight"].dtype
    limit = _parse_size(max_shard_size)
    shards, size = [{}], 0
    for name, t in tensors.items():
        n_bytes = t.numel() * t.element_size()
        if shards[-1] and size + n_bytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n_bytes

    for old in folder.iterdir():
        if _SHARD_NAME.fullmatch(old.name) or old.name == "model.safetensors.index.json":
            old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"max_shard_size '{size}' is not a size like 500MB, 5GB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
