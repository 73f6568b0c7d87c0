"""Our Conformer encoder against `torchaudio.models.Conformer` of the same size (same weights, batch, dtype,
device; interleaved rounds), and the ASR real-time factor of the composed speech model.

    python benchmarks/bench_conformer.py --preset small --seconds 10 --batch 8 --device cpu
    python benchmarks/bench_conformer.py --preset conformer-1b --seconds 20 --batch 16 --device cuda --dtype bfloat16

Measures
- encoder throughput in audio-seconds per second: forward (eval, no autograd) and forward + backward
  (train mode, sum of outputs as the loss, no optimizer step) on a batch of --batch utterances of
  --seconds seconds of log-mel features (100 frames/s). Ours: `speech.conformer.ConformerEncoder`
  (stride-4 stacking + projection, rotary attention, masked BatchNorm); the peer: the same stacker
  followed by `torchaudio.models.Conformer`, its weights copied into our blocks (`block_state_from_torchaudio`), i.e.
  no rotary embeddings (torchaudio has none) and its plain BatchNorm;
- ASR real-time factor (decode wall time / audio duration, lower is better) of the composed model
  (log-mel front end + encoder + adapter + frozen LM, greedy batched decoding with the KV cache, exactly
  --asr-tokens new tokens per utterance) on --asr-batch utterances of --seconds seconds.
Each figure is the best of --repeats rounds (other processes only ever slow a round down).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.multimodal import MultimodalModel  # noqa: E402
from adapters.multimodal_config import MultimodalConfig, SpeechModality  # noqa: E402
from adapters.speech_adapter import preset as adapter_preset  # noqa: E402
from adapters.speech_inputs import audio_span  # noqa: E402
from language import Llama  # noqa: E402
from language import preset as llama_preset  # noqa: E402
from speech.conformer import ConformerEncoder, block_state_from_torchaudio  # noqa: E402
from speech.conformer import preset as conformer_preset  # noqa: E402
from speech.features import FrameStacker  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FRAMES_PER_SECOND = 100


class TorchaudioEncoder(torch.nn.Module):
    """Our frame stacker + torchaudio's Conformer, whose (random) weights are copied into `ours`' blocks so both
    models hold the same weights (ours adds rotary embeddings, which have no weights)."""

    def __init__(self, ours: ConformerEncoder):
        super().__init__()
        import torchaudio
        c = ours.config
        self.stacker = FrameStacker(c.n_mels, c.dim, c.stack)
        self.stacker.load_state_dict(ours.stacker.state_dict())
        self.conformer = torchaudio.models.Conformer(input_dim=c.dim, num_heads=c.n_heads, ffn_dim=c.ffn_dim,
                                                     num_layers=c.n_layers, depthwise_conv_kernel_size=c.conv_kernel)
        for ta_layer, block in zip(self.conformer.conformer_layers, ours.layers):
            block.load_state_dict(block_state_from_torchaudio(ta_layer.state_dict()))

    def forward(self, features, lengths):
        x, out_lengths = self.stacker(features, lengths)
        return self.conformer(x, out_lengths)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def encoder_rounds(model, features, lengths, device, dtype, repeats, train: bool) -> float:
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        model.eval()
        with torch.no_grad(), autocast:
            model(features, lengths)

    def forward_backward():
        model.train()
        with autocast:
            out = model(features, lengths)[0]
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)

    fn = forward_backward if train else forward
    fn()  # warm-up
    return best_time(fn, device, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seconds", type=float, default=10.0, help="audio seconds per utterance")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lm-preset", default="tiny-lm", help="frozen LM of the RTF measurement (random weights)")
    p.add_argument("--asr-batch", type=int, default=8)
    p.add_argument("--asr-tokens", type=int, default=16)
    p.add_argument("--skip", nargs="*", default=[], choices=["encoder", "asr"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    config = conformer_preset(args.preset)
    ours = ConformerEncoder(config).to(device)
    frames = int(args.seconds * FRAMES_PER_SECOND)
    features = torch.randn(args.batch, frames, config.n_mels, device=device)
    lengths = torch.full((args.batch,), frames, device=device)
    audio_seconds = args.batch * args.seconds
    results = {"preset": args.preset, "parameters": ours.num_parameters(), "batch": args.batch,
               "seconds": args.seconds, "device": str(device), "dtype": args.dtype,
               "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if "encoder" not in args.skip:
        peer = TorchaudioEncoder(ours).to(device)
        for mode in ("forward", "forward_backward"):
            t_ours, t_peer = [], []
            for _ in range(args.repeats):  # interleaved rounds
                t_ours.append(encoder_rounds(ours, features, lengths, device, dtype, 1, mode != "forward"))
                t_peer.append(encoder_rounds(peer, features, lengths, device, dtype, 1, mode != "forward"))
            results[mode] = {"ours_audio_s_per_s": audio_seconds / min(t_ours),
                             "torchaudio_audio_s_per_s": audio_seconds / min(t_peer),
                             "ours_over_torchaudio": min(t_peer) / min(t_ours)}
    if "asr" not in args.skip:
        lm = Llama(llama_preset(args.lm_preset))
        adapter = adapter_preset("small" if config.dim >= 256 else "tiny", encoder_dim=config.dim,
                                 lm_dim=lm.config.dim)
        model = MultimodalModel(MultimodalConfig(language=lm.config, speech=SpeechModality(encoder=config,
                                                                                          adapter=adapter)),
                                language_model=lm).to(device).eval()
        waves = torch.randn(args.asr_batch, int(args.seconds * 16000), device=device) * 0.1
        n_frames = model.speech_frontend.config.num_frames(waves.shape[1])
        span = audio_span(model.placeholder_count(n_frames), model.tokens.audio_tokens)
        prompt = [1, 2, 3] + span + [4]

        def decode():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                speech = model.speech_features(waves)
                model.generate([prompt] * args.asr_batch, speech=speech, max_new_tokens=args.asr_tokens)

        decode()
        elapsed = best_time(decode, device, args.repeats)
        results["asr"] = {"real_time_factor": elapsed / (args.asr_batch * args.seconds), "batch": args.asr_batch,
                          "new_tokens": args.asr_tokens, "lm": args.lm_preset, "seconds_per_batch": elapsed}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
