"""The one model folder of a composed model, written by every recipe and read by eval, chat and later stages.

    <folder>/config.json            {"format": "herd-multimodal", "version": 1,
                                     "model": MultimodalConfig dict (LM shape, modalities, placement, special tokens),
                                     "language_model": {"path": where the frozen LM is read from, "sha256": digest},
                                     "tokenizer": "tokenizer" (a subfolder) or a path,
                                     "settings": {modality: what its recipe records, e.g. the speech task}}
    <folder>/adapters.safetensors   every weight and buffer that is not the LM's (encoders, adapters, extra tokens)
    <folder>/tokenizer/             the tokenizer (its chat format is picked from it), when it can be saved
    <folder>/language_model/        the LM itself, only when no checkpoint path can be named (a random or a
                                    trained LM): an HF folder

The LM's weights are otherwise never copied; `sha256` (over the LM's tensors as loaded, `language_digest`)
makes sure that the LM found at load time is the one the adapters were trained on. Folders are written to a
temporary sibling and renamed, so a crash never leaves a half-written folder. `compose` joins folders whose
adapters were trained in separate runs on the same LM (`herd compose OUT IN...`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from language.checkpoints import save_hf
from language.model import Llama
from language.tokenizer import load_tokenizer

from .multimodal import MultimodalModel
from .multimodal_config import MultimodalConfig

FORMAT, VERSION = "herd-multimodal", 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR, LM_DIR = "config.json", "adapters.safetensors", "tokenizer", "language_model"


class ModelFolderError(ValueError):
    """A model folder that cannot be read or written; the message names the folder and what is wrong."""


@dataclass
class LoadedModel:
    """A model folder, loaded: the model (eval mode, everything frozen), its tokenizer, config.json as a dict."""
    model: MultimodalModel
    tokenizer: object
    meta: dict = field(default_factory=dict)

    @property
    def settings(self) -> dict:
        return self.meta.get("settings", {})


def language_digest(model: Llama) -> str:
    """sha256 over the LM's tensors (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def is_model_folder(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def find_model_folder(path) -> Path:
    """A model folder, or a run folder whose final/ is one."""
    path = Path(path)
    for folder in (path, path / "final"):
        if is_model_folder(folder):
            return folder
    raise ModelFolderError(f"{path}: not a model folder (no {CONFIG_FILE} + {WEIGHTS_FILE} in it or in its final/; "
                           f"an unfinished run? resume it first)")


def save_model(model: MultimodalModel, folder, *, tokenizer, language_path: Optional[str] = None,
               tokenizer_path: Optional[str] = None, settings: Optional[dict] = None,
               weights: Optional[dict[str, torch.Tensor]] = None, language_sha256: Optional[str] = None) -> Path:
    """Write a model folder (see the module docstring). language_path: a checkpoint the frozen LM is read from
    (None: the LM is saved into the folder). weights: the non-LM tensors to save (default: the model's own, e.g.
    a gathered ZeRO-3 state). language_sha256: the LM's `language_digest` as `load_model` reads it (default:
    computed by reading the LM back, so a model the engine cast to bf16 still records its checkpoint's digest).
    Replaces an existing folder only once the new one is complete."""
    folder = Path(folder)
    state = model.non_language_state() if weights is None else weights
    expected = set(model.non_language_state())
    if set(state) != expected:
        raise ModelFolderError(f"{folder}: the weights to save do not match the model: missing "
                               f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", "written_by": "herd"})
        if hasattr(tokenizer, "save"):
            tokenizer.save(tmp / TOKENIZER_DIR)
            tokenizer_ref = TOKENIZER_DIR
        elif tokenizer_path:
            tokenizer_ref = str(Path(tokenizer_path).resolve())
        else:
            raise ModelFolderError(f"{folder}: the tokenizer cannot be saved; give tokenizer_path")
        if language_path is None:
            save_hf(model.language_model, tmp / LM_DIR)
            lm_ref, lm_read = LM_DIR, tmp / LM_DIR
        else:
            lm_ref = lm_read = str(Path(language_path).resolve())
        if language_sha256 is None:  # of the LM as load_model will read it (the engine may have cast the model)
            language_sha256 = language_digest(Llama.from_pretrained(lm_read))
        meta = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(),
                "language_model": {"path": lm_ref, "sha256": language_sha256},
                "tokenizer": tokenizer_ref, "settings": settings or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        _replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _replace(tmp: Path, folder: Path) -> None:
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(folder) -> dict:
    """config.json of a model folder, checked for format and version."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: cannot read: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ModelFolderError(f"{path}: not a {FORMAT} v{VERSION} model folder (format {meta.get('format')!r}, "
                               f"version {meta.get('version')!r})")
    return meta


def _resolve(folder: Path, ref: str) -> Path:
    path = Path(ref)
    return path if path.is_absolute() else folder / path


def load_model(path, *, device="cpu", language_path: Optional[str] = None, verify: bool = True) -> LoadedModel:
    """A model folder (or a run folder holding final/) -> LoadedModel, the model frozen and in eval mode.
    language_path: read the frozen LM from there instead of the recorded path (the digest must still match
    unless verify=False)."""
    folder = find_model_folder(path)
    meta = read_meta(folder)
    try:
        config = MultimodalConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{folder / CONFIG_FILE}: bad 'model' entry: {e}") from None
    lm_path = Path(language_path) if language_path else _resolve(folder, meta["language_model"]["path"])
    if not lm_path.exists():
        raise ModelFolderError(f"{folder}: its base language model {lm_path} is missing (move it back, or pass "
                               f"the same LM's new path)")
    language_model = Llama.from_pretrained(lm_path)
    if verify:
        found, recorded = language_digest(language_model), meta["language_model"].get("sha256")
        if found != recorded:
            raise ModelFolderError(f"{folder}: the language model at {lm_path} (sha256 {found[:12]}) is not the one "
                                   f"its adapters were trained on (sha256 {str(recorded)[:12]})")
    try:
        model = MultimodalModel(config, language_model=language_model)
    except ValueError as e:
        raise ModelFolderError(f"{folder}: {e}") from None
    weights = load_file(str(folder / WEIGHTS_FILE))
    expected = model.non_language_state()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    shapes = [f"{k} {tuple(weights[k].shape)} (config: {tuple(v.shape)})" for k, v in expected.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{what} {names[:4]}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                 for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                 if names]
        raise ModelFolderError(f"{folder / WEIGHTS_FILE}: does not match {CONFIG_FILE}: " + "; ".join(parts))
    model.load_state_dict(weights, strict=False)
    model.freeze_for_stage("frozen")
    tokenizer = load_tokenizer(_resolve(folder, meta["tokenizer"]))
    return LoadedModel(model.to(device).eval(), tokenizer, meta)


@dataclass
class BaseLanguage:
    """A frozen LM named by a path: a checkpoint, or a model folder (e.g. a base stage's) whose LM it reads, with
    that folder's tokenizer, trained special-token rows (extra_tokens (n_extra, dim), None for a checkpoint)
    and settings. checkpoint: where the LM's weights are (what a model folder trained on it records)."""
    model: Llama
    checkpoint: Path
    tokenizer: Optional[Path] = None
    extra_tokens: Optional[torch.Tensor] = None
    settings: dict = field(default_factory=dict)


def language_checkpoint(path) -> Path:
    """Where the LM a path names lies: a model folder's recorded LM, or the path itself (a checkpoint)."""
    path = Path(path)
    return _resolve(path, read_meta(path)["language_model"]["path"]) if is_model_folder(path) else path


def load_language(path) -> BaseLanguage:
    """The LM of a checkpoint path or of a model folder (its digest checked)."""
    path = Path(path)
    if not is_model_folder(path):
        return BaseLanguage(Llama.from_pretrained(path), path)
    meta = read_meta(path)
    checkpoint = language_checkpoint(path)
    if not checkpoint.exists():
        raise ModelFolderError(f"{path}: its base language model {checkpoint} is missing")
    lm = Llama.from_pretrained(checkpoint)
    found, recorded = language_digest(lm), meta["language_model"].get("sha256")
    if found != recorded:
        raise ModelFolderError(f"{path}: the language model at {checkpoint} (sha256 {found[:12]}) is not the one the "
                               f"folder records (sha256 {str(recorded)[:12]})")
    extra = load_file(str(path / WEIGHTS_FILE)).get("extra_token_embeddings.weight")
    return BaseLanguage(lm, checkpoint, _resolve(path, meta["tokenizer"]), extra, meta.get("settings", {}))


def compose(sources: Sequence, out) -> Path:
    """One model folder holding every modality of `sources` (model folders trained on the same base LM; each
    modality from one source). Different base LMs are refused with one line naming both."""
    if len(sources) < 2:
        raise ModelFolderError("compose needs at least two model folders")
    folders = [find_model_folder(s) for s in sources]
    metas = [read_meta(f) for f in folders]
    first = metas[0]
    for folder, meta in zip(folders[1:], metas[1:]):
        a, b = first["language_model"]["sha256"], meta["language_model"]["sha256"]
        if a != b:
            raise ModelFolderError(f"different base LMs: {folders[0]} was trained on {first['language_model']['path']} "
                                   f"(sha256 {a[:12]}), {folder} on {meta['language_model']['path']} (sha256 {b[:12]})")
        if meta["model"]["special_tokens"] != first["model"]["special_tokens"]:
            raise ModelFolderError(f"{folder}: its special tokens {meta['model']['special_tokens']} differ from "
                                   f"{folders[0]}'s {first['model']['special_tokens']}")
    model_dict = dict(first["model"])
    weights: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    settings = {}
    for folder, meta in zip(folders, metas):
        w = load_file(str(folder / WEIGHTS_FILE))
        for modality in ("image", "speech"):
            if meta["model"].get(modality) is None:
                continue
            if modality in owner:
                raise ModelFolderError(f"both {owner[modality]} and {folder} hold a {modality} modality; compose "
                                       f"takes each modality from one folder")
            owner[modality] = folder
            model_dict[modality] = meta["model"][modality]
            prefixes = _PREFIXES[modality]
            weights.update({k: v for k, v in w.items() if k.startswith(prefixes)})
            if modality in meta.get("settings", {}):
                settings[modality] = meta["settings"][modality]
        settings.update({k: v for k, v in meta.get("settings", {}).items() if k not in ("image", "speech")})
    model_dict["n_extra_tokens"] = max(m["model"]["n_extra_tokens"] for m in metas)
    config = MultimodalConfig.from_dict(model_dict)
    weights["extra_token_embeddings.weight"] = _merged_extra_rows(config, folders, owner)
    lm_meta = first["language_model"]
    lm_path = _resolve(folders[0], lm_meta["path"])
    loaded = load_model(folders[0], language_path=str(lm_path))  # also checks the LM digest
    model = MultimodalModel(config, language_model=loaded.model.language_model)
    return save_model(model, out, tokenizer=loaded.tokenizer, settings=settings, weights=weights,
                      language_path=None if lm_meta["path"] == LM_DIR else str(lm_path))


_PREFIXES = {"image": ("vision_model.", "multi_modal_projector.", "cross_attention_layers."),
             "speech": ("speech_encoder.", "speech_adapter.", "speech_frontend.")}


def _merged_extra_rows(config: MultimodalConfig, folders: list[Path], owner: dict[str, Path]) -> torch.Tensor:
    """The extra token table: each special token's row from the folder that trained its modality."""
    tokens = config.special_tokens
    table = torch.zeros(config.n_extra_tokens, config.language.dim)
    base = load_file(str(folders[0] / WEIGHTS_FILE))["extra_token_embeddings.weight"]
    table[:base.shape[0]] = base
    for modality, folder in owner.items():
        rows = load_file(str(folder / WEIGHTS_FILE))["extra_token_embeddings.weight"]
        for r in tokens.rows([modality]):
            if r < rows.shape[0]:
                table[r] = rows[r]
    return table
