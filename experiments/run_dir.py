"""Where a run writes: runs/<experiment>/<YYYYmmdd-HHMMSS>/ (config.yaml, metrics.jsonl, checkpoints/,
plots, summary.json). Resuming finds the newest run of the experiment that holds a checkpoint.
runs/<experiment>/latest links to the newest finished run, so a later stage's YAML can name its outputs
(e.g. `runs/quickstart/latest/final`)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError


def new_run_dir(output_dir: str, experiment: str) -> Path:
    """A fresh, unique run folder (on rank 0; other ranks receive its name, see cli.py)."""
    base = Path(output_dir) / experiment
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run, n = base / stamp, 1
    while run.exists():
        n += 1
        run = base / f"{stamp}-{n}"
    run.mkdir(parents=True)
    return run


def find_resume_dir(output_dir: str, experiment: str, resume) -> Optional[Path]:
    """resume=true: newest run of the experiment with a complete checkpoint; resume=PATH: that run."""
    if resume is False or resume is None:
        return None
    if isinstance(resume, str) and resume.lower() not in ("true", "latest"):
        path = Path(resume)
        if not (path / "checkpoints").is_dir():
            raise ConfigError(f"key 'resume': '{resume}' is not a run folder with checkpoints/")
        return path
    base = Path(output_dir) / experiment
    runs = sorted((p for p in base.glob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: p.name, reverse=True)
    for run in runs:
        ckpts = run / "checkpoints"
        if ckpts.is_dir() and any(c.is_dir() and c.name.startswith("step_") and ".tmp" not in c.name
                                  for c in ckpts.iterdir()):
            return run
    raise ConfigError(f"key 'resume': no run of '{experiment}' under {base} has a complete checkpoint")


def mark_latest(run_dir: Path) -> None:
    """Point runs/<experiment>/latest at run_dir (atomic rename of a fresh relative symlink)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)
