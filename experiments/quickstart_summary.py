"""The quickstart's final summary: each stage's learning figure next to its baseline, its time, and a timeline.

    herd quickstart-summary [--runs runs] [--started EPOCH_SECONDS]

Reads `runs/<experiment>/latest/summary.json` of every stage of `make quickstart` (a stage not run yet is listed
as missing), prints a table, and writes `runs/quickstart_summary.md` and `runs/quickstart_summary.png` (one bar
per stage on a wall-clock axis, so stages that ran side by side show as overlapping bars). `--started`: when
`make quickstart` began (the Makefile passes it), for the wall time from start to summary.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

FINAL_MODEL = "runs/quickstart_mm_joint/latest/final"


@dataclass(frozen=True)
class Stage:
    name: str
    experiment: str  # the run folder under runs/
    figure: Callable[[dict], tuple[str, str]]  # summary -> (what was learned, the baseline it is measured against)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _text(s: dict) -> tuple[str, str]:
    gate = str(s.get("niah_gates", ""))
    niah = "gate FAILED, the run went on" if gate.startswith("FAILED") else "gate passed" if gate else "no gate"
    return (f"held-out ppl {s['val_ppl_final']:.0f}; NIAH {s.get('niah_final', float('nan')):.2f} ({niah})",
            f"unigram ppl {s['unigram_ppl']:.0f}")


def _clip(s: dict) -> tuple[str, str]:
    return f"retrieval i2t {_pct(s['i2t_accuracy'])}, t2i {_pct(s['t2i_accuracy'])}", f"chance {_pct(s['chance'])}"


def _base(s: dict) -> tuple[str, str]:
    keys = ("image_text", "spoken_question", "copy")
    return (", ".join(f"{k} {s[f'eval_{k}_loss']:.2f}" for k in keys) + " (held-out loss)",
            ", ".join(f"{s[f'eval_{k}_loss_before']:.2f}" for k in keys) + " before training")


def _image(s: dict) -> tuple[str, str]:
    h = s["heldout"]
    return (f"held-out scenes VQA {_pct(h['vqa_accuracy'])} (+{h['points_over_blind']:.1f} points; target +40)",
            f"blind {_pct(h['blind_accuracy'])}")


def _speech(s: dict) -> tuple[str, str]:
    h = s["heldout_voices"]
    return (f"held-out voices WER {_pct(h['wer'])} (target <= 10%)",
            f"untrained WER {_pct(h['baseline_wer'])}" if "baseline_wer" in h else "")


def _joint(s: dict) -> tuple[str, str]:
    b = s["before"]
    asr = f"; ASR WER {_pct(s['asr_wer'])} (before {_pct(b['asr_wer'])})" if "asr_wer" in s else ""
    ratio = f"{s['spoken_over_typed']:.2f}" if "spoken_over_typed" in s else "-"  # absent when typed is 0
    return (f"spoken questions {_pct(s['spoken_accuracy'])} vs typed {_pct(s['vqa_accuracy'])} "
            f"(ratio {ratio}, target 0.8; +{s['spoken_points_over_blind']:.1f} over blind, "
            f"target +30){asr}",
            f"blind {_pct(s['blind_accuracy'])}; composed before the stage: spoken {_pct(b['spoken_accuracy'])}")


STAGES = (Stage("text", "quickstart", _text), Stage("image encoder (CLIP)", "quickstart_image_clip", _clip),
          Stage("base LM", "quickstart_base", _base), Stage("image adapter", "quickstart_mm_image", _image),
          Stage("speech adapter", "quickstart_mm_speech", _speech), Stage("joint", "quickstart_mm_joint", _joint))


def _run_folder(runs: Path, experiment: str) -> Optional[Path]:
    latest = runs / experiment / "latest"
    return latest.resolve() if (latest / "summary.json").is_file() else None


def _started(folder: Path) -> float:
    """A run folder's name is its start time (YYYYMMDD-HHMMSS, local time)."""
    return datetime.strptime(folder.name[:15], "%Y%m%d-%H%M%S").timestamp()


def collect(runs: Path) -> list[dict]:
    """One row per stage: name, experiment, figure, baseline, start (epoch s), seconds; missing stages: None."""
    rows = []
    for stage in STAGES:
        folder = _run_folder(runs, stage.experiment)
        row = {"stage": stage.name, "experiment": stage.experiment, "figure": "not run", "baseline": "",
               "start": None, "seconds": None}
        if folder is not None:
            summary = json.loads((folder / "summary.json").read_text())
            try:
                row["figure"], row["baseline"] = stage.figure(summary)
            except KeyError as e:
                row["figure"] = f"summary.json lacks {e}"
            row["seconds"] = summary.get("wall_time_s")
            row["start"] = _started(folder)
        rows.append(row)
    return rows


def _minutes(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def write(rows: list[dict], runs: Path, wall_s: Optional[float]) -> str:
    """The markdown table (also returned) and the timeline PNG."""
    lines = ["| stage | learned | baseline | minutes |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['figure']} | {r['baseline']} | {_minutes(r['seconds'])} |" for r in rows]
    cpu = sum(r["seconds"] or 0 for r in rows)
    lines.append(f"\nStage time {cpu / 60:.1f} min" + (f", wall time {wall_s / 60:.1f} min" if wall_s else "")
                 + " (stages ran side by side where 2 cores allow).")
    lines.append(f"\nChat with the composed model: `herd chat --model {FINAL_MODEL}`")
    text = "\n".join(lines) + "\n"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "quickstart_summary.md").write_text(text)
    _timeline(rows, runs / "quickstart_summary.png")
    return text


def _timeline(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["start"] is not None and r["seconds"] is not None]
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.2))
    t0 = min((r["start"] for r in done), default=0.0)
    for y, r in enumerate(rows):
        if r in done:
            ax.barh(y, r["seconds"] / 60, left=(r["start"] - t0) / 60, color="tab:blue", alpha=0.7)
            ax.text((r["start"] - t0 + r["seconds"]) / 60 + 0.2, y, r["figure"][:70], va="center", fontsize=7)
    end = max(((r["start"] - t0 + r["seconds"]) / 60 for r in done), default=1.0)
    ax.set_xlim(0, 2.2 * end)  # room for the figures written after the bars
    ax.set_yticks(range(len(rows)), [r["stage"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("minutes since the first stage began")
    ax.set_title("make quickstart: stages on the wall clock, with what each learned")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def quickstart_summary_cli(args) -> int:
    runs = Path(args.runs)
    rows = collect(runs)
    wall = time.time() - args.started if args.started else None
    print(write(rows, runs, wall), end="")
    missing = [r["stage"] for r in rows if r["seconds"] is None]
    if missing:
        print(f"herd: not run yet: {', '.join(missing)}")
    return 0
