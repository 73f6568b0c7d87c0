"""Metrics JSON lines, curve plots, summary tables and the progress display."""

import io
import json

import torch

from training import MetricsLogger, Progress, plot_curves, read_metrics, summary_table


def test_metrics_logger_appends_json_lines(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"loss": torch.tensor(2.5), "lr": 1e-3})
    logger.log(2, loss=2.0, tokens=128)
    logger.log(2, {"eval/loss": 2.2, "eval/accuracy": 0.4})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')  # a crash mid-line
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[0]["loss"] == 2.5 and records[1]["tokens"] == 128 and "time" in records[0]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_metrics_logger_off_rank0_writes_nothing(tmp_path):
    MetricsLogger(tmp_path, enabled=False).log(1, loss=1.0)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_plot_curves_writes_a_png(tmp_path):
    logger = MetricsLogger(tmp_path)
    for s in range(1, 21):
        logger.log(s, loss=3.0 / s, lr=1e-3)
        if s % 5 == 0:
            logger.log(s, {"eval/loss": 3.5 / s, "eval/vqa_accuracy": s / 40})
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_summary_table_flat_and_nested():
    flat = summary_table({"loss": 1.23456, "steps": 100, "lr": 3e-05, "skipped": 0}, title="run")
    lines = flat.splitlines()
    assert lines[0] == "run" and lines[1].split() == ["name", "value"]
    assert "1.2346" in flat and "3e-05" in flat
    assert len({len(line) for line in lines[3:]}) == 1  # right-aligned values: equal widths
    nested = summary_table({"8B": {"WER": 3.4, "BLEU": 29.5}, "70B": {"WER": 3.1}})
    rows = nested.splitlines()
    assert rows[0].split() == ["WER", "BLEU"] and rows[2].split() == ["8B", "3.4000", "29.5000"]
    assert rows[3].split() == ["70B", "3.1000"]


def test_progress_prints_lines_when_not_a_tty():
    out = io.StringIO()
    progress = Progress(total_steps=10, print_every=4, stream=out, enabled=True)
    for step in range(1, 11):
        progress.update(step, loss=1.0 / step, tokens=100)
    progress.close()
    lines = out.getvalue().strip().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["train step 4/10", "train step 8/10", "train step 10/10"]
    assert "tok/s" in lines[0] and "eta" in lines[0]


def test_progress_bar_in_a_terminal():
    out = io.StringIO()
    progress = Progress(total_steps=5, stream=out, enabled=True, use_bar=True)
    for step in range(1, 6):
        progress.update(step, loss=0.5, tokens=10)
    progress.close()
    assert "5/5" in out.getvalue() and "loss=0.5000" in out.getvalue()


def test_progress_disabled_prints_nothing():
    out = io.StringIO()
    progress = Progress(total_steps=5, print_every=1, stream=out, enabled=False)
    progress.update(1, loss=1.0)
    progress.close()
    assert out.getvalue() == ""
