"""The post-training pipeline end to end on a generated task with exact answers (issue 4, item 7).

    base -> SFT -> reward model -> rejection sampling -> DPO        (each stage: its own recipe)

1. `task`: language/synthetic_tasks.py writes SFT, ranked, prompt and held-out files from a seed. A share
   `task.sft_flawed` of the SFT demonstrations make the kind's systematic mistake (imperfect human demos):
   SFT copies it, and the preference stages are what remove it.
2. `base`: `base_model.init_from` (e.g. SmolLM2-135M-Instruct's GGUF), or a tiny model built from `base_model.preset`
   with the byte-level tokenizer made here (256 bytes + the Llama 3 special tokens; one character per
   token, so string tasks are learnable by a tiny model on CPU).
3. `sft` (recipes/sft.py) from the base on the SFT file; held-out accuracy before (= base) and after.
4. `annotate`: K samples of the SFT model on other training prompts, labelled by the task's checker (the
   demo's stand-in for human preference annotation): rows (correct answer > wrong sample).
5. `rm` (recipes/reward_model.py) from the SFT model (`rm_init: sft`) or the base, on those rows plus the
   generator's ranked rows (correct > near miss > far miss); pairwise accuracy on held-out ranked rows.
6. `rejection_sampling` (recipes/rejection_sampling.py): K samples of the SFT model per training prompt,
   scored by the RM; accuracy of the kept (best-scoring) samples vs plain samples.
7. `dpo` (recipes/dpo.py) from the SFT model on pairs from those samples: chosen = a correct sample (the
   reference answer when none is: an "edited" response), rejected = the RM's favourite wrong sample; with
   `dpo_pairs: reward_model`, the RM's best vs worst sample instead (no checker involved).
Averaging: each stage's `average` section (mean of the last snapshots) gives its final model.

Each stage runs in <run>/<stage>/ and resumes from its own checkpoints; a finished stage is not rerun.
The summary holds four comparisons, each with its standard error and `passed` = the improvement exceeds
`z` standard errors: base vs SFT accuracy, RM pairwise accuracy vs chance (0.5), best-of-K vs plain
samples, DPO vs SFT accuracy (paired over the same prompts).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from language.chat_format import chat_format_for
from language.model import Llama
from language.sampling import sample_k
from language.synthetic_tasks import TaskConfig, is_correct, write_task_files
from language.tokenizer import load_tokenizer, train_bpe
from training.distributed import is_rank0
from training.precision import resolve_device

from ..common import RunConfig
from ..config import ExistingPath
from . import dpo, rejection_sampling, reward_model, sft
from ..text.posttrain import ModelSection, load_lm, resolve_checkpoint, save_lm
from ..text.posttrain_eval import load_prompts, paired_improvement, write_json

BYTE_VOCAB = 256 + 16  # train_bpe: 256 byte tokens (no merges) + TRAIN_SPECIAL_TOKENS


@dataclass
class DemoTokenizer:
    path: Optional[ExistingPath] = field(default=None, metadata={
        "help": "tokenizer; null = the base model's, or (tiny base) a byte-level one made in the run"})


@dataclass
class AnnotateSection:
    k: int = field(default=8, metadata={"range": (1, None), "help": "policy samples per prompt"})
    temperature: float = field(default=1.0, metadata={"range": (0.0, None)})
    max_new_tokens: int = field(default=32, metadata={"range": (1, None)})
    prompts_per_batch: int = field(default=32, metadata={"range": (1, None)})
    max_wrong: int = field(default=2, metadata={"range": (0, None), "help": "rows (correct > wrong sample) per prompt"})
    synthetic: bool = field(default=True, metadata={"help": "also train the RM on the generator's ranked rows"})


@dataclass
class Config(RunConfig):
    recipe: str = "posttrain_demo"
    task: TaskConfig = field(default_factory=TaskConfig)
    base_model: ModelSection = field(default_factory=lambda: ModelSection(preset="tiny"))
    tokenizer: DemoTokenizer = field(default_factory=DemoTokenizer)
    sft: sft.Config = field(default_factory=sft.Config)
    annotate: AnnotateSection = field(default_factory=AnnotateSection)
    rm: reward_model.Config = field(default_factory=reward_model.Config)
    rm_init: Literal["sft", "base"] = field(default="sft", metadata={"help": "the reward model starts from this model"})
    rejection_sampling: rejection_sampling.Config = field(default_factory=rejection_sampling.Config)
    dpo: dpo.Config = field(default_factory=dpo.Config)
    dpo_pairs: Literal["checker", "reward_model"] = field(default="checker", metadata={
        "help": "checker: correct vs the RM's favourite wrong sample; reward_model: RM best vs worst"})
    z: float = field(default=2.0, metadata={"range": (0.0, None), "help": "an improvement passes above z std errors"})


def run(cfg: Config, run_dir: Path) -> dict:
    t0 = time.time()
    files = _task_files(cfg, run_dir)
    tok_path = _tokenizer(cfg, run_dir)
    base_path = _base(cfg, run_dir, tok_path)
    stage = _Stages(cfg, run_dir, tok_path)

    sft_dir = stage.run("sft", sft, cfg.sft, base_path, data={"train": files["sft_train"]},
                        eval={"path": files["sft_eval"]})
    t1 = time.time()
    rm_train = _annotate(cfg, run_dir / "annotate", sft_dir / "final", files)
    stage.times["annotate"] = round(time.time() - t1, 1)
    rm_dir = stage.run("rm", reward_model, cfg.rm, sft_dir / "final" if cfg.rm_init == "sft" else base_path,
                       data={"train": str(rm_train), "eval": files["ranked_eval"]})
    rs_dir = stage.run("rejection_sampling", rejection_sampling, cfg.rejection_sampling, sft_dir / "final",
                       data={"prompts": files["prompts_train"]}, reward_model=str(rm_dir / "final"), resume=True)
    pairs = _dpo_pairs(cfg, rs_dir, run_dir / "dpo_pairs.jsonl")
    dpo_dir = run_dir / "dpo"
    if is_rank0() and (sft_dir / "eval_final.json").is_file() and not (dpo_dir / "eval_initial.json").exists():
        dpo_dir.mkdir(exist_ok=True)  # DPO starts from the SFT model: its initial accuracy is SFT's final one
        shutil.copy(sft_dir / "eval_final.json", dpo_dir / "eval_initial.json")
    stage.run("dpo", dpo, cfg.dpo, sft_dir / "final", data={"train": str(pairs)}, eval={"path": files["sft_eval"]})

    summary = _summary(cfg, run_dir, stage.summaries)
    summary["wall_time_s"] = round(time.time() - t0, 1)
    summary["stage_wall_time_s"] = stage.times
    write_json(run_dir / "posttrain_summary.json", summary)
    _figure(summary, run_dir / "posttrain_demo.png")
    return summary


def _task_files(cfg: Config, run_dir: Path) -> dict[str, str]:
    folder = run_dir / "task"
    manifest = folder / "files.json"
    if not manifest.is_file():  # deterministic from cfg.task: a resumed run finds the same files
        paths = write_task_files(cfg.task, folder) if is_rank0() else {}
        write_json(manifest, {k: str(v) for k, v in paths.items()})
    return json.loads(manifest.read_text())


def _tokenizer(cfg: Config, run_dir: Path) -> str:
    if cfg.tokenizer.path:
        return str(cfg.tokenizer.path)
    if cfg.base_model.init_from:
        return str(resolve_checkpoint(cfg.base_model.init_from))
    folder = run_dir / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        text = folder / "alphabet.txt"
        text.write_text("".join(chr(i) for i in range(32, 127)))
        train_bpe([text], BYTE_VOCAB, folder)  # 256 learned ids = the byte alphabet itself: no merges
        text.unlink()
    return str(folder)


def _base(cfg: Config, run_dir: Path, tok_path: str) -> Path:
    """The starting model's folder: `base_model.init_from`, or a fresh tiny model saved in <run>/base."""
    if cfg.base_model.init_from:
        return resolve_checkpoint(cfg.base_model.init_from)
    folder = run_dir / "base"
    if not (folder / "config.json").is_file():
        import torch
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(tok_path)
        model = load_lm(cfg.base_model, tokenizer.vocab_size)
        save_lm(model.config, model.state_dict(), tokenizer, folder)
    return folder


class _Stages:
    """Runs a stage recipe in <run>/<name>/ with its paths filled in; skips a stage that has finished."""

    def __init__(self, cfg: Config, run_dir: Path, tok_path: str):
        self.cfg, self.run_dir, self.tok_path = cfg, run_dir, tok_path
        self.summaries: dict[str, dict] = {}
        self.times: dict[str, float] = {}

    def run(self, name: str, recipe, section, init_from, *, data: dict, eval: Optional[dict] = None,
            resume: bool = False, **top) -> Path:
        folder = self.run_dir / name
        done = folder / "stage_summary.json"
        if done.is_file():
            self.summaries[name] = json.loads(done.read_text())
            return folder
        self.mark()
        folder.mkdir(parents=True, exist_ok=True)
        sub = replace(section, experiment=f"{self.cfg.experiment}/{name}", seed=self.cfg.seed,
                      output_dir=str(self.run_dir), resume=resume,
                      model=replace(section.model, init_from=str(init_from)),
                      tokenizer=replace(section.tokenizer, path=self.tok_path),
                      data=replace(section.data, **data), **top)
        if eval is not None:
            sub = replace(sub, eval=replace(section.eval, **eval))
        t0 = time.time()
        print(f"herd: posttrain_demo stage {name} in {folder}", flush=True)
        summary = recipe.run(sub, folder)
        if "stopped_at_step" in summary or "stopped_at_batch" in summary:
            raise RuntimeError(f"stage {name} stopped early (stop_after_*): the demo needs every stage to finish")
        self.times[name] = round(time.time() - t0, 1)
        self.summaries[name] = summary
        write_json(done, summary)
        self.mark()
        return folder

    def mark(self) -> None:
        """checkpoints/step_<stages done>/state.json: lets `resume=true` find this run (each stage resumes
        from its own checkpoints; finished stages are skipped)."""
        if not is_rank0():
            return
        root = self.run_dir / "checkpoints"
        final = root / f"step_{len(self.summaries):08d}"
        tmp = root / f"{final.name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "state.json").write_text(json.dumps({"stages_done": sorted(self.summaries)}))
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        for old in root.iterdir():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def _annotate(cfg: Config, folder: Path, policy_path: Path, files: dict) -> Path:
    """Reward-model rows from labelled policy samples (+ the generator's ranked rows); written once."""
    out = folder / "rm_train.jsonl"
    if out.is_file():
        return out
    a = cfg.annotate
    tokenizer = load_tokenizer(policy_path)
    fmt = chat_format_for(tokenizer)
    policy = Llama.from_pretrained(policy_path).to(resolve_device(cfg.rejection_sampling.device)).eval()
    prompts, _ = load_prompts(files["prompts_annotate"], fmt, max_prompt_len=policy.config.max_seq_len - a.max_new_tokens)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows, n_samples, n_correct = [], 0, 0
    for b in range(0, len(prompts), a.prompts_per_batch):
        chunk = prompts[b:b + a.prompts_per_batch]
        samples = sample_k(policy, [p.ids for p in chunk], k=a.k, max_new_tokens=a.max_new_tokens,
                           temperature=a.temperature, stop_ids=fmt.stop_ids, seed=cfg.seed * 1_000_003 + 500_000 + b,
                           pad_id=pad_id)
        for p, row in zip(chunk, samples):
            texts = [tokenizer.decode(s.ids, skip_special=True) for s in row if s.stopped]
            n_samples += len(row)
            n_correct += sum(is_correct(p.reference, t) for t in texts)
            wrong = list(dict.fromkeys(t.strip() for t in texts if t.strip() and not is_correct(p.reference, t)))
            prompt = [{"role": m.role, "content": m.content} for m in p.messages]
            rows += [{"prompt": prompt, "responses": [{"role": "assistant", "content": p.reference},
                                                      {"role": "assistant", "content": w}], "kind": p.kind,
                      "source": "policy"} for w in wrong[:a.max_wrong]]
    if a.synthetic:
        rows += [json.loads(line) for line in Path(files["ranked_train"]).read_text().splitlines() if line]
    if not rows:
        raise RuntimeError("annotate: no reward-model rows (every policy sample was right and annotate.synthetic is off)")
    write_json(folder / "annotate_summary.json", {"prompts": len(prompts), "samples": n_samples,
                                                   "sample_accuracy": n_correct / max(n_samples, 1),
                                                   "rows": len(rows)})
    if is_rank0():
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out)
    return out


def _dpo_pairs(cfg: Config, rs_dir: Path, out: Path) -> Path:
    """Preference rows for DPO from the rejection-sampling samples (see the module docstring)."""
    if cfg.dpo_pairs == "reward_model":
        return rs_dir / "pairs.jsonl"
    rows = []
    for line in (rs_dir / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "correct" not in r:
            continue
        scored = [j for j, s in enumerate(r["scores"]) if s is not None]
        wrong = [j for j in scored if not r["correct"][j]]
        if not wrong:
            continue
        right = [j for j in scored if r["correct"][j]]
        chosen = r["samples"][max(right, key=lambda j: r["scores"][j])] if right else r["reference"]
        rejected = r["samples"][max(wrong, key=lambda j: r["scores"][j])]
        prompt = [{"role": m["role"], "content": m["content"]} for m in r["prompt"]]
        rows.append({"prompt": prompt, "chosen": {"role": "assistant", "content": chosen},
                     "rejected": {"role": "assistant", "content": rejected}, "kind": r["kind"],
                     "chosen_from": "sample" if right else "reference"})
    if is_rank0():
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _accuracy_pair(stage_dir: Path, z: float) -> dict:
    initial = json.loads((stage_dir / "eval_initial.json").read_text())
    final = json.loads((stage_dir / "eval_final.json").read_text())
    return paired_improvement(final["correct"], initial["correct"], z=z)


def _summary(cfg: Config, run_dir: Path, stages: dict[str, dict]) -> dict:
    rm_eval = json.loads((run_dir / "rm" / "eval_final.json").read_text())
    rm_acc, rm_se = rm_eval["pairwise_accuracy"], rm_eval["std_error"]
    rs = stages["rejection_sampling"]
    rs_cmp = dict(rs["best_vs_plain"]) if rs.get("best_vs_plain") else {"passed": False, "improvement": float("nan")}
    comparisons = {
        "sft_vs_base_accuracy": _accuracy_pair(run_dir / "sft", cfg.z),
        "rm_pairwise_accuracy_vs_chance": {
            "before": 0.5, "after": rm_acc, "improvement": rm_acc - 0.5, "std_error": rm_se,
            "n": rm_eval["examples"], "pairs": rm_eval["pairs"], "passed": bool(rm_acc - 0.5 > cfg.z * rm_se)},
        "rejection_sampled_vs_plain_sample_accuracy": rs_cmp,
        "dpo_vs_sft_accuracy": _accuracy_pair(run_dir / "dpo", cfg.z),
    }
    return {"comparisons": comparisons, "all_passed": all(c["passed"] for c in comparisons.values()),
            "z": cfg.z, "rs_kept": rs.get("kept"), "rs_prompts": rs.get("prompts"),
            "rs_accuracy_any_of_k": rs.get("accuracy_any_of_k"),
            "dpo_pairs": sum(1 for _ in open(run_dir / "dpo_pairs.jsonl")) if (run_dir / "dpo_pairs.jsonl").is_file()
            else None,
            "sft_accuracy_by_kind": stages["sft"].get("accuracy_by_kind"),
            "dpo_accuracy_by_kind": stages["dpo"].get("accuracy_by_kind")}


def _figure(summary: dict, path: Path) -> None:
    """One panel per comparison: before / after with +-z standard-error bars on the difference."""
    if not is_rank0():
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    comps = summary["comparisons"]
    labels = {"sft_vs_base_accuracy": ("base", "SFT"), "rm_pairwise_accuracy_vs_chance": ("chance", "RM"),
              "rejection_sampled_vs_plain_sample_accuracy": ("plain sample", "best of K"),
              "dpo_vs_sft_accuracy": ("SFT", "DPO")}
    fig, axes = plt.subplots(1, len(comps), figsize=(3.2 * len(comps), 3.2))
    for ax, (name, c) in zip(axes, comps.items()):
        before, after = c.get("before", float("nan")), c.get("after", float("nan"))
        ax.bar([0, 1], [before, after], color=["#999999", "#3a7" if c["passed"] else "#c44"])
        ax.errorbar([1], [after], yerr=[summary["z"] * c.get("std_error", 0.0)], color="k", capsize=4)
        ax.set_xticks([0, 1], labels[name])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{name.split('_vs_')[0]}\n+{c.get('improvement', float('nan')):.3f}"
                     f" ({'pass' if c['passed'] else 'fail'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
