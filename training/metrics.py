"""Metrics: a JSON-lines log per run, loss/eval curves as a PNG, and plain-text summary tables.

Record convention (one JSON object per line of ``run_dir/metrics.jsonl``): ``{"step": int, "time": unix
seconds, <name>: number, ...}``. Training records carry ``loss`` (plus ``lr``, ``grad_norm``, ...);
evaluation metrics are any key starting with ``eval`` (``eval/loss``, ``eval_vqa_accuracy``, ...).
"""

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

from . import distributed as distr

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    """Tensors/numpy scalars -> Python numbers; other values unchanged."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


class MetricsLogger:
    """Appends JSON lines to ``run_dir/metrics.jsonl``; only rank 0 writes (others are no-ops)."""

    def __init__(self, run_dir: Path, enabled: bool | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = distr.is_rank0() if enabled is None else enabled
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, Any] | None = None, **more: Any) -> None:
        """Append ``{"step": step, "time": now, **metrics, **more}`` (one line, flushed)."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in {**(metrics or {}), **more}.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file (a truncated last line, from a crash mid-write, is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_curves(metrics_jsonl: Path, out_png: Path) -> Path:
    """Plot train ``loss`` and every logged ``eval*`` metric vs step (one panel each) into ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_jsonl)
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval")})
    panels = ["loss"] + eval_keys
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False, sharex=True)
    for ax, key in zip(axes[:, 0], panels):
        xs, ys = _series(records, key)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1, label=key)
        ax.set_ylabel(key if key != "loss" else "train loss")
        ax.grid(alpha=0.3)
        if not xs:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    overlay = [k for k in eval_keys if k.endswith("loss")]  # eval losses also on the train-loss panel
    for key in overlay:
        axes[0, 0].plot(*_series(records, key), linestyle="--", marker=".", linewidth=1, label=key)
    if overlay:
        axes[0, 0].legend(fontsize="small")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(Path(metrics_jsonl).parent.name or "metrics")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _fmt(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}"
    return str(value)


def summary_table(data: dict[str, Any], title: str | None = None) -> str:
    """A plain aligned text table.

    ``{"loss": 1.23, "steps": 100}`` -> two columns (name, value);
    ``{"run A": {"loss": 1.2, "acc": 0.5}, "run B": {...}}`` -> one row per key, one column per inner key.
    """
    if data and all(isinstance(v, dict) for v in data.values()):
        cols = list(dict.fromkeys(k for row in data.values() for k in row))
        header = [""] + cols
        rows = [[str(name)] + [_fmt(row.get(c, "")) if c in row else "" for c in cols] for name, row in data.items()]
    else:
        header = ["name", "value"]
        rows = [[str(k), _fmt(v)] for k, v in data.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = ([title] if title else []) + [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    return "\n".join(out)
