"""BEST-RQ self-supervised pre-training of the Conformer (Chiu et al. 2022; paper Sec 8).

- Span masking (`SpanMasking`) on the normalised log-mel features, counted in 10 ms feature frames: each
  valid frame starts a span of `mask_span` (32 = 320 ms) frames with probability `mask_start_prob` (2.5%),
  spans are clipped at the utterance end, and an utterance with fewer than `min_spans` starts gets random
  extra ones (so every utterance has something to predict). About 1 - 0.975**32 = 55% of frames are masked.
  Masked frames are replaced by Gaussian noise N(0, 0.1^2) as in BEST-RQ (`mask_replacement="noise"`), or
  by one learned 80-dim vector (`"learned"`, as wav2vec 2.0's mask embedding).
- Targets (`RandomProjectionQuantizer`): the *unmasked* features stacked 4 at a time (320 dims, aligned
  with the encoder's 40 ms frames), projected per codebook by a frozen random Xavier-uniform matrix to 16
  dims, l2-normalised, and matched by cosine to 8,192 frozen l2-normalised Gaussian code vectors; 16
  independent codebooks. Everything comes from one seed; the buffers stay float32 under module casts and
  are saved/restored exactly (safetensors, `save`/`load`, and the module's state dict).
- Loss: one linear softmax head per codebook on the encoder output; cross-entropy on the 40 ms frames
  that contain at least one masked feature frame, averaged over codebooks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .conformer import ConformerConfig, ConformerEncoder
from .features import stack_frames, valid_mask

MASK_REPLACEMENTS = ("noise", "learned")
_QUANTIZER_KEYS = ("input_dim", "code_dim", "codebook_size", "n_codebooks", "seed")


@dataclass
class BestRQConfig:
    """Masking, quantizer and head settings (the encoder has its own ConformerConfig)."""
    mask_span: int = field(default=32, metadata={"range": (1, None), "help": "span length in feature frames"})
    mask_start_prob: float = field(default=0.025, metadata={"range": (0.0, 1.0), "help": "span start probability per frame"})
    min_spans: int = field(default=1, metadata={"range": (0, None), "help": "spans forced per utterance"})
    mask_replacement: str = field(default="noise", metadata={"help": "noise | learned"})
    mask_noise_std: float = field(default=0.1, metadata={"range": (0.0, None), "help": "std of the replacement noise"})
    codebook_size: int = field(default=8192, metadata={"range": (2, None), "help": "codes per codebook"})
    n_codebooks: int = field(default=16, metadata={"range": (1, None), "help": "independent codebooks / heads"})
    code_dim: int = field(default=16, metadata={"range": (1, None), "help": "projected dimension"})
    quantizer_seed: int = field(default=0, metadata={"help": "seed of the random projection and codebooks"})

    def __post_init__(self):
        if self.mask_replacement not in MASK_REPLACEMENTS:
            raise ValueError(f"BestRQConfig.mask_replacement must be one of {MASK_REPLACEMENTS}, "
                             f"got {self.mask_replacement!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sample_span_mask(lengths: torch.Tensor, max_len: int, span: int, start_prob: float, min_spans: int = 1,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, max_len) bool, True at masked frames (always inside each row's valid length). Sampled on the
    CPU (from `generator`, else the global RNG) so a seed gives the same mask on any device."""
    cpu_lengths = lengths.detach().cpu().long()
    b = cpu_lengths.shape[0]
    valid = valid_mask(cpu_lengths, max_len)
    starts = (torch.rand(b, max_len, generator=generator) < start_prob) & valid
    for _ in range(4 * min_spans):  # random extra starts (a draw may repeat one: retry a few times)
        lacking = (starts.sum(1) < min_spans) & (starts.sum(1) < cpu_lengths)
        if not bool(lacking.any()):
            break
        extra = (torch.rand(b, generator=generator) * cpu_lengths.clamp(min=1)).long()
        starts[lacking.nonzero().flatten(), extra[lacking]] = True
    # frame t is masked when a span started in t-span+1 .. t
    counts = F.pad(starts.long().cumsum(1), (span, 0))
    masked = (counts[:, span:] - counts[:, :-span]) > 0
    return (masked & valid).to(lengths.device)


class SpanMasking(nn.Module):
    """features (B, T, C) + lengths -> (masked features, mask (B, T) bool). See the module docstring."""

    def __init__(self, config: BestRQConfig, n_mels: int):
        super().__init__()
        self.config = config
        self.mask_embedding = nn.Parameter(torch.randn(n_mels) * config.mask_noise_std) \
            if config.mask_replacement == "learned" else None

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, generator: Optional[torch.Generator] = None):
        c = self.config
        mask = sample_span_mask(lengths, features.shape[1], c.mask_span, c.mask_start_prob, c.min_spans, generator)
        if self.mask_embedding is not None:
            replacement = self.mask_embedding.to(features.dtype).expand_as(features)
        else:
            gen_device = generator.device if generator is not None else features.device
            replacement = (torch.randn(features.shape, generator=generator, device=gen_device)
                           * c.mask_noise_std).to(device=features.device, dtype=features.dtype)
        return torch.where(mask[..., None], replacement, features), mask


class RandomProjectionQuantizer(nn.Module):
    """Frozen BEST-RQ targets: x (B, T, input_dim) -> codes (B, T, n_codebooks) long.

    Buffers: `projection` (n_codebooks, input_dim, code_dim) Xavier-uniform, `codebooks`
    (n_codebooks, codebook_size, code_dim) l2-normalised Gaussian; both float32, drawn from `seed`."""

    def __init__(self, input_dim: int = 320, code_dim: int = 16, codebook_size: int = 8192, n_codebooks: int = 16,
                 seed: int = 0):
        super().__init__()
        self.input_dim, self.code_dim, self.codebook_size, self.n_codebooks = input_dim, code_dim, codebook_size, n_codebooks
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        projection = torch.empty(n_codebooks, input_dim, code_dim)
        for matrix in projection:
            nn.init.xavier_uniform_(matrix, generator=gen)
        codebooks = F.normalize(torch.randn(n_codebooks, codebook_size, code_dim, generator=gen), dim=-1)
        self.register_buffer("projection", projection)
        self.register_buffer("codebooks", codebooks)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, chunk_elements: int = 1 << 26) -> torch.Tensor:
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"quantizer expects input dim {self.input_dim}, got {tuple(x.shape)}")
        flat = x.reshape(-1, self.input_dim)
        codes = torch.empty(flat.shape[0], self.n_codebooks, dtype=torch.long, device=x.device)
        step = max(1, chunk_elements // (self.n_codebooks * self.codebook_size))
        with torch.autocast(x.device.type, enabled=False):
            for i in range(0, flat.shape[0], step):
                chunk = flat[i:i + step].float()
                projected = F.normalize(torch.einsum("nd,cde->cne", chunk, self.projection), dim=-1)
                similarity = torch.bmm(projected, self.codebooks.transpose(1, 2))  # (C, n, V)
                codes[i:i + step] = similarity.argmax(-1).T
        return codes.view(*x.shape[:-1], self.n_codebooks)

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts (.half(), .to(bf16)) do not: the codes must not change."""
        exact = {"projection": self.projection, "codebooks": self.codebooks}
        super()._apply(fn, recurse)
        for name, original in exact.items():
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, original.to(getattr(self, name).device))
        return self

    def _metadata(self) -> dict:
        return {k: str(getattr(self, k)) for k in _QUANTIZER_KEYS}

    def save(self, path) -> None:
        """Write the projection and codebooks (float32, exact) with their shape/seed as metadata."""
        from safetensors.torch import save_file
        save_file({"projection": self.projection.detach().cpu().contiguous(),
                   "codebooks": self.codebooks.detach().cpu().contiguous()}, str(path), metadata=self._metadata())

    @classmethod
    def load(cls, path) -> "RandomProjectionQuantizer":
        """Rebuild a quantizer from `save`'s file; the stored tensors replace the seeded ones."""
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quantizer file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if set(_QUANTIZER_KEYS) - set(meta) or set(f.keys()) != {"projection", "codebooks"}:
                raise ValueError(f"{path}: not a RandomProjectionQuantizer file (metadata {meta}, keys {list(f.keys())})")
            quantizer = cls(**{k: int(meta[k]) for k in _QUANTIZER_KEYS})
            quantizer.projection.copy_(f.get_tensor("projection"))
            quantizer.codebooks.copy_(f.get_tensor("codebooks"))
        return quantizer


def usage_perplexity(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """codes (N, C) -> (C,) perplexity exp(entropy) of each codebook's code histogram (1 .. codebook_size)."""
    n, c = codes.shape
    offsets = torch.arange(c, device=codes.device) * codebook_size
    counts = torch.bincount((codes + offsets).flatten(), minlength=c * codebook_size).view(c, codebook_size)
    p = counts.float() / max(n, 1)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)
    return entropy.exp()


@dataclass
class BestRQOutput:
    """loss: mean over masked 40 ms frames of the codebook-mean cross-entropy; loss_sum and n_masked give
    the engine's (sum, count) pair; metrics: floats (loss, masked_fraction, accuracy, accuracy/<i>,
    usage_perplexity, usage_perplexity/<i>)."""
    loss: torch.Tensor
    loss_sum: torch.Tensor
    n_masked: int
    metrics: dict


class BestRQModel(nn.Module):
    """Conformer encoder + span masking + frozen quantizer + one softmax head per codebook.

    forward(features (B, T, n_mels) normalised log-mel, lengths (B,), generator=None) -> BestRQOutput."""

    def __init__(self, encoder_config: ConformerConfig, config: Optional[BestRQConfig] = None):
        super().__init__()
        self.config = config = config or BestRQConfig()
        self.encoder = ConformerEncoder(encoder_config)
        self.masking = SpanMasking(config, encoder_config.n_mels)
        self.quantizer = RandomProjectionQuantizer(encoder_config.n_mels * encoder_config.stack, config.code_dim,
                                                   config.codebook_size, config.n_codebooks, config.quantizer_seed)
        self.heads = nn.ModuleList(nn.Linear(encoder_config.dim, config.codebook_size)
                                   for _ in range(config.n_codebooks))

    def targets(self, features: torch.Tensor, lengths: torch.Tensor):
        """Codes (B, ceil(T/stack), n_codebooks) of the unmasked features and their lengths."""
        stacked, out_lengths = stack_frames(features, lengths, self.encoder.config.stack)
        return self.quantizer(stacked), out_lengths

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> BestRQOutput:
        stack = self.encoder.config.stack
        codes, out_lengths = self.targets(features, lengths)
        masked_features, feature_mask = self.masking(features, lengths, generator)
        hidden, _ = self.encoder(masked_features, lengths)
        frame_mask = stack_frames(feature_mask[..., None].float(), lengths, stack)[0].amax(-1) > 0  # (B, T')
        valid = valid_mask(out_lengths, hidden.shape[1])
        frame_mask &= valid
        n_masked = int(frame_mask.sum())
        h, target = hidden[frame_mask], codes[frame_mask]  # (M, dim), (M, C)
        losses, correct = [], []
        for i, head in enumerate(self.heads):
            logits = head(h).float()
            losses.append(F.cross_entropy(logits, target[:, i], reduction="sum"))
            correct.append((logits.argmax(-1) == target[:, i]).sum())
        loss_sum = torch.stack(losses).mean()
        loss = loss_sum / max(n_masked, 1)
        accuracy = torch.stack(correct).float() / max(n_masked, 1)
        perplexity = usage_perplexity(codes[valid], self.config.codebook_size)
        summary = torch.cat([torch.stack([loss.detach(), frame_mask.sum() / valid.sum().clamp(min=1),
                                          accuracy.mean(), perplexity.mean()]), accuracy, perplexity]).tolist()
        c = self.config.n_codebooks
        metrics = dict(zip(("loss", "masked_fraction", "accuracy", "usage_perplexity"), summary[:4]))
        metrics.update({f"accuracy/{i}": v for i, v in enumerate(summary[4:4 + c])})
        metrics.update({f"usage_perplexity/{i}": v for i, v in enumerate(summary[4 + c:])})
        return BestRQOutput(loss=loss, loss_sum=loss_sum, n_masked=n_masked, metrics=metrics)

    def gradient_checkpointing_enable(self) -> None:
        self.encoder.gradient_checkpointing_enable()
