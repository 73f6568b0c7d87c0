"""Our Llama against `transformers.LlamaForCausalLM`: same config, same weights, batch, dtype and device,
measured in the same run, ours and HF interleaved so that machine noise hits both alike.

    python benchmarks/bench_llama.py --preset tiny-lm --seq 256 --batch 4 --device cpu
    python benchmarks/bench_llama.py --preset llama3.2-1b --seq 2048 --batch 4 --device cuda --dtype bfloat16

Measures
- train: tokens/s of forward + cross-entropy + backward + AdamW step, and MFU: model FLOPs
  (6 * N_matmul + 12 * n_layers * seq * n_heads * head_dim per token: PaLM's count, attention without
  a causal discount; N_matmul = every matmul weight incl. lm_head, not the embedding lookup) over
  the peak measured in this run (CUDA: a bf16 8192^3 matmul; CPU: an fp32 matmul);
- prefill: tokens/s of one prompt pass that fills a KV cache and gives the last position's logits
  (what generation does first; HF with `logits_to_keep=1`);
- decode: new tokens/s at batch 1 from greedy `generate` (ours: `language.generation.generate` with the
  static cache; HF: `generate` with its default cache), prompt of --decode-prompt tokens; the time of
  generating 1 token is subtracted, so prefill does not count.
Each figure is the best of --repeats rounds (other processes on a shared machine only ever slow a
round down, so the fastest round is the closest to the machine's own speed); --json also keeps every
round. Prints a table with ours/HF.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from language import Llama, preset  # noqa: E402
from language.checkpoints.hf import config_to_hf  # noqa: E402
from language.generation import generate, prefill  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_llama(config, dtype, device):
    """`transformers.LlamaForCausalLM` of the same shape as our config (SDPA attention, default cache)."""
    import transformers
    hf_config = transformers.LlamaConfig(**config_to_hf(config, dtype), bos_token_id=None, eos_token_id=None,
                                         pad_token_id=0, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(hf_config).to(device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured matmul FLOP/s: bf16 8192^3 on CUDA, fp32 2048^3 on CPU (best of a few)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 10 if device.type == "cuda" else 3
    a @ b
    best = min(timed(lambda: [a @ b for _ in range(reps)], device) / reps for _ in range(5))
    return 2 * n ** 3 / best, f"{str(dtype).removeprefix('torch.')} {n}^3 matmul"


def cpu_name() -> str:
    """The CPU model name (as `lscpu` shows it), or the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_params(model: Llama) -> int:
    """Weights that take part in a matmul: every Linear (incl. lm_head, tied or not)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_flops_per_token(config, n_matmul: int, seq: int) -> float:
    return 6 * n_matmul + 12 * config.n_layers * seq * config.n_heads * config.head_dim


# ---------------------------------------------------------------- the three measurements

def make_train_step(model, logits_of, tokens):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        logits = logits_of(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_train(ours, hf, tokens, steps, repeats, device):
    ours.train()
    hf.train()
    runs = {"ours": make_train_step(ours, lambda t: ours(t), tokens),
            "hf": make_train_step(hf, lambda t: hf(input_ids=t, use_cache=False).logits, tokens)}
    for step in runs.values():  # warm-up (allocator, AdamW state)
        step()
        step()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, step in runs.items():
            times[name].append(timed(lambda: [step() for _ in range(steps)], device) / steps)
    return times


@torch.inference_mode()
def bench_prefill(ours, hf, tokens, repeats, device):
    ours.eval()
    hf.eval()
    batch, seq = tokens.shape
    runs = {"ours": lambda: prefill(ours, tokens, None, ours.new_cache(batch, seq)),
            "hf": lambda: hf(input_ids=tokens, use_cache=True, logits_to_keep=1)}
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run, device))
    return times


@torch.inference_mode()
def bench_decode(ours, hf, prompt, new_tokens, repeats, device):
    """Seconds of generate(1) and generate(new_tokens) per round at batch 1, and whether both models
    produced the same greedy tokens."""
    ours.eval()
    hf.eval()
    ids = torch.tensor([prompt], device=device)

    def hf_generate(n):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()

    runs = {"ours": lambda n: generate(ours, [prompt], max_new_tokens=n)[0], "hf": hf_generate}
    outputs = {name: run(new_tokens) for name, run in runs.items()}  # warm-up, and the tokens to compare
    times = {name: {"1": [], str(new_tokens): []} for name in runs}  # seconds of generate(n) per round
    for _ in range(repeats):
        for name, run in runs.items():
            times[name]["1"].append(timed(lambda: run(1), device))
            times[name][str(new_tokens)].append(timed(lambda: run(new_tokens), device))
    return times, outputs["ours"] == outputs["hf"]


# ---------------------------------------------------------------- driver

def best(rounds: dict[str, list[float]]) -> dict[str, float]:
    return {name: min(seconds) for name, seconds in rounds.items()}


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    config = preset(args.preset)
    needed = max(args.seq, args.decode_prompt + args.decode_tokens)
    if config.max_seq_len < needed:
        config = preset(args.preset, max_seq_len=needed)
    load_before = os.getloadavg()[0]  # other processes on the machine (1-minute load average)
    torch.manual_seed(args.seed)
    hf = hf_llama(config, dtype, device)
    ours = Llama(config).to(device=device, dtype=dtype)
    ours.load_state_dict(hf.state_dict())  # identical weights (HF names)

    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    import transformers
    result = {
        "preset": args.preset, "seq": args.seq, "batch": args.batch, "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "steps": args.steps, "repeats": args.repeats,
        "parameters": ours.num_parameters(), "matmul_parameters": matmul_params(ours),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "command": " ".join(["python", Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
    }
    rows = []
    peaks = [matmul_peak(device)]  # measured before and after training; the higher one counts
    if "train" not in args.skip:
        rounds = bench_train(ours, hf, tokens, args.steps, args.repeats, device)
        result["train_step_seconds_per_round"] = rounds
        peaks.append(matmul_peak(device))
        step_s = best(rounds)
        flops = train_flops_per_token(config, result["matmul_parameters"], args.seq) * args.batch * args.seq
        peak = max(peaks)[0]
        result["train_tokens_per_s"] = {k: args.batch * args.seq / v for k, v in step_s.items()}
        result["train_mfu"] = {k: flops / v / peak for k, v in step_s.items()}
        rows.append(("train tokens/s", result["train_tokens_per_s"], "{:,.0f}"))
        rows.append(("train MFU", result["train_mfu"], "{:.1%}"))
    result["peak_flops"], result["peak_measured_with"] = max(peaks)
    result["peak_flops_measurements"] = [p for p, _ in peaks]
    if "prefill" not in args.skip:
        result["prefill_seconds_per_round"] = rounds = bench_prefill(ours, hf, tokens, args.repeats, device)
        seconds = best(rounds)
        result["prefill_tokens_per_s"] = {k: args.batch * args.seq / v for k, v in seconds.items()}
        rows.append(("prefill tokens/s", result["prefill_tokens_per_s"], "{:,.0f}"))
    if "decode" not in args.skip:
        prompt = tokens[0, :args.decode_prompt].tolist()
        rounds, same = bench_decode(ours, hf, prompt, args.decode_tokens, args.repeats, device)
        result["decode_generate_seconds_per_round"] = rounds
        per_token = {k: (min(v[str(args.decode_tokens)]) - min(v["1"])) / (args.decode_tokens - 1)
                     for k, v in rounds.items()}
        result["decode_tokens_per_s"] = {k: 1 / v for k, v in per_token.items()}
        result["decode_same_tokens"] = same
        rows.append((f"decode tokens/s (B=1, prompt {args.decode_prompt})", result["decode_tokens_per_s"],
                     "{:,.1f}"))
    result["load_average_before_after"] = [load_before, os.getloadavg()[0]]
    print_table(result, rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict, rows) -> None:
    print(f"{result['preset']}: {result['parameters'] / 1e6:.1f}M parameters, batch {result['batch']}, "
          f"seq {result['seq']}, {result['dtype']} on {result['device']} ({result['machine']}, "
          f"{result['threads']} threads); peak {result['peak_flops'] / 1e12:.3f} TFLOP/s "
          f"({result['peak_measured_with']}); torch {result['torch']}, transformers {result['transformers']}")
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'ours':>12}  {'HF':>12}  {'ours/HF':>8}")
    for name, values, fmt in rows:
        print(f"{name:{width}}  {fmt.format(values['ours']):>12}  {fmt.format(values['hf']):>12}  "
              f"{values['ours'] / values['hf']:>8.2f}")
    if "decode_same_tokens" in result:
        print(f"greedy decode gave the same tokens as HF: {result['decode_same_tokens']}")
    before, after = result["load_average_before_after"]
    print(f"load average before/after: {before:.2f}/{after:.2f} on {result['cpus']} CPUs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-lm", help="model preset (language.config.PRESETS)")
    p.add_argument("--seq", type=int, default=256, help="sequence length of train and prefill batches")
    p.add_argument("--batch", type=int, default=4, help="batch size of train and prefill")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=3, help="train steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (best reported)")
    p.add_argument("--decode-prompt", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "prefill", "decode"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    args = p.parse_args(argv)
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be at least 2")
    if args.decode_prompt > args.seq:
        p.error(f"--decode-prompt {args.decode_prompt} is longer than --seq {args.seq} (the prompt is cut from it)")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
