"""Image-adapter training step: our `adapters.MultimodalModel` (an image modality) against
`transformers.MllamaForConditionalGeneration`, same config, same weights (ours is loaded from the HF model's
`save_pretrained` folder), same batch, dtype, device and frozen set, in the same run, ours and HF interleaved round
by round.

    python benchmarks/bench_image_adapter.py                                 # CPU, the "small" config
    python benchmarks/bench_image_adapter.py --device cuda --dtype bfloat16 --size base --batch 16

Frozen set (both models): the language model (embeddings incl. the `<|image|>` rows, self-attention layers,
final norm, lm_head) is frozen; the image encoder, the projector and the cross-attention layers train (paper
Sec 7.3, adapter pre-training). One step = forward, cross-entropy over every next-token position, backward,
`torch.optim.AdamW` step over the trainable parameters, `zero_grad(set_to_none=True)`.
Every sample holds one image of --tiles tiles, its `<|image|>` token first, so every text row sees the image:
our logits then equal transformers' (tests/adapters/test_mllama_parity.py) and the first-step losses are
printed side by side as a check.

Reported per model: samples/s (best round: other processes only ever slow a round down), peak memory of the
step above what was allocated before it (CUDA: `max_memory_allocated`; CPU: the process's peak RSS, reset
through /proc/self/clear_refs before each round), and the ratio ours/HF.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.image_tokens import ImageTextCollator  # noqa: E402
from adapters.mllama_checkpoint import load_mllama  # noqa: E402
from adapters.multimodal import ImageInputs  # noqa: E402
from vision.tiling import TiledImage, TilingConfig, aspect_ratio_id  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SIZES = {
    # vision: hidden, layers, global layers, heads, MLP, tile, intermediate layers; text: vocab, hidden, self layers,
    # heads, KV heads, FFN; cross-attention layers (indices among all text layers, as Mllama counts them)
    "tiny": dict(vision=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                             intermediate_size=64, image_size=28, intermediate_layers_indices=[0, 1]),
                 text=dict(vocab_size=512, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, cross_attention_layers=[1, 4])),
    "small": dict(vision=dict(hidden_size=128, num_hidden_layers=4, num_global_layers=1, attention_heads=4,
                              intermediate_size=512, image_size=112, intermediate_layers_indices=[1, 3]),
                  text=dict(vocab_size=4096, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=768, cross_attention_layers=[2, 5])),
    "base": dict(vision=dict(hidden_size=768, num_hidden_layers=12, num_global_layers=2, attention_heads=12,
                             intermediate_size=3072, image_size=224, intermediate_layers_indices=[3, 7, 11]),
                 text=dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=20, num_attention_heads=16,
                           num_key_value_heads=4, intermediate_size=2816, cross_attention_layers=[3, 8, 13, 18])),
}


def hf_config(size: str):
    from transformers import MllamaConfig
    s = SIZES[size]
    vision = dict(s["vision"], patch_size=14, max_num_tiles=4,
                  vision_output_dim=s["vision"]["hidden_size"] * (len(s["vision"]["intermediate_layers_indices"]) + 1))
    text = dict(s["text"], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=s["text"]["vocab_size"])


def build_models(size: str, device, dtype, folder: Path):
    """The HF model (random init, gates opened so every path counts) and ours loaded from its saved folder."""
    from transformers import MllamaForConditionalGeneration
    torch.manual_seed(0)
    hf = MllamaForConditionalGeneration(hf_config(size))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "gate" in name.rsplit(".", 1)[-1]:
                p.uniform_(-1.0, 1.0)
    hf.save_pretrained(folder)
    ours = load_mllama(folder)
    cross = set(hf.config.text_config.cross_attention_layers)
    for name, p in hf.named_parameters():  # LM frozen; encoder, projector and cross-attention layers train
        layer = name.split("language_model.layers.")[1].split(".")[0] if "language_model.layers." in name else None
        p.requires_grad_(name.startswith(("model.vision_model.", "model.multi_modal_projector."))
                         or (layer is not None and int(layer) in cross))
    ours.freeze_for_stage("adapter_pretrain")
    if ours.extra_token_embeddings is not None:  # HF's image-token rows are part of the frozen embedding
        ours.extra_token_embeddings.requires_grad_(False)
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    if n_hf != n_ours:
        raise RuntimeError(f"trainable parameter counts differ: ours {n_ours}, HF {n_hf}")
    return ours.to(device=device, dtype=dtype).train(), hf.to(device=device, dtype=dtype).train(), n_ours


def make_batch(size: str, batch: int, seq: int, tiles: int, device, dtype) -> dict:
    s = SIZES[size]
    tile, vocab = s["vision"]["image_size"], s["text"]["vocab_size"]
    layout = {1: (1, 1), 2: (1, 2), 4: (2, 2)}[tiles]
    gen = torch.Generator().manual_seed(1)
    samples = []
    for b in range(batch):
        pixels = torch.randn(tiles, 3, tile, tile, generator=gen)
        image = TiledImage(pixels, layout, aspect_ratio_id(layout, 4), (tile * layout[0], tile * layout[1]),
                           (tile * layout[0], tile * layout[1]))
        tokens = [vocab] + torch.randint(3, vocab, (seq - 1,), generator=gen).tolist()
        samples.append({"tokens": tokens, "images": [image]})
    collate = ImageTextCollator(image_token_id=vocab, tiling=TilingConfig(tile_size=tile, max_tiles=4, max_images=1),
                                policy="most_recent")
    out = collate(samples)
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in out.items() if v is not None}


def step_fns(ours, hf, b):
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    labels = b["labels"]
    images = ImageInputs.from_batch(b)

    def loss_of(logits):
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def ours_step():
        loss = loss_of(ours(b["tokens"], images=images))
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return float(loss.detach())

    def hf_step():
        out = hf(input_ids=b["tokens"], attention_mask=b["attention_mask"].long(), pixel_values=b["pixel_values"],
                 aspect_ratio_ids=b["aspect_ratio_ids"], aspect_ratio_mask=b["aspect_ratio_mask"],
                 cross_attention_mask=b["cross_attention_mask"], use_cache=False)
        loss = loss_of(out.logits)
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return float(loss.detach())

    return ours_step, hf_step


def _proc_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(fn, steps: int, device) -> tuple[float, float | None]:
    """(seconds for `steps` steps, peak extra memory in MiB during them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _proc_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
        except OSError:
            base = None
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        hwm = _proc_kb("VmHWM")
        peak = (hwm - base) / 1024 if base is not None and hwm is not None else None
    return time.perf_counter() - start, peak


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64, help="text tokens per sample, <|image|> included")
    p.add_argument("--tiles", type=int, choices=[1, 2, 4], default=4)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per model (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the figures and every round here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, trainable = build_models(args.size, device, dtype, Path(tmp))
    b = make_batch(args.size, args.batch, args.seq, args.tiles, device, dtype)
    ours_step, hf_step = step_fns(ours, hf, b)
    first = {"ours": ours_step(), "hf": hf_step()}  # warm-up; same weights and batch: same loss
    rounds = {"ours": [], "hf": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours_step), ("hf", hf_step)):
            rounds[name].append(measure(fn, args.steps, device))
    result = {"size": args.size, "device": str(device), "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
              "tiles": args.tiles, "trainable_parameters": trainable, "first_step_loss": first,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rounds": rounds}
    for name in ("ours", "hf"):
        best = min(t for t, _ in rounds[name])
        peaks = [m for _, m in rounds[name] if m is not None]
        result[name] = {"samples_per_s": args.batch * args.steps / best, "step_s": best / args.steps,
                        "peak_mib": max(peaks) if peaks else None}
    result["speed_ratio"] = result["ours"]["samples_per_s"] / result["hf"]["samples_per_s"]
    if result["ours"]["peak_mib"] and result["hf"]["peak_mib"]:
        result["memory_ratio"] = result["ours"]["peak_mib"] / result["hf"]["peak_mib"]
    print(f"image adapter step, size {args.size}, {device} {args.dtype}, batch {args.batch} x {args.seq} tokens, "
          f"{args.tiles} tiles, {trainable:,} trainable parameters, {result['threads']} threads")
    print(f"first-step loss: ours {first['ours']:.6f}  HF {first['hf']:.6f}")
    print(f"{'':6}{'samples/s':>12}{'step s':>10}{'peak MiB':>10}")
    for name in ("ours", "hf"):
        r = result[name]
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        print(f"{name:6}{r['samples_per_s']:12.2f}{r['step_s']:10.3f}{peak:>10}")
    print(f"ours/HF speed {result['speed_ratio']:.2f}x" + (f", memory {result['memory_ratio']:.2f}x"
                                                            if "memory_ratio" in result else ""))
    print(f"load average before {load_before[0]:.2f}, after {result['loadavg_after'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
