"""speech/asterisk.py on a miniature package tree (the real packages: tests/experiments/test_data_prepare_speech.py)."""
import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speech import asterisk
from speech.asterisk import AsteriskError, build_asterisk_manifests, clean_prompt_text, extract_deb, \
    fetch_packages, parse_transcripts, prepare_asterisk, unpack_packages
from speech.manifests import DataWarning, load_jsonl_manifest


EN = """; Core Asterisk Sounds in English

digits/7: seven
digits/1: one
digits/70: seventy
beep: [this is a simple beep tone]
silence/1: (1 second of silence)
letters/at: at [@]
agent-pass: Please enter your password followed by the pound key.
demo-instruct: A very long demonstration.
vm-intro: Please leave your message. (simple tone sound plays)
no-wav-here: This prompt has no recording.
"""
ES = """; Core Asterisk Sounds in Spanish

digits/7: siete
digits/1f: una
digits/7: diez
vm-greet: Sus saludos [temporales] estan en uso
agent-pass: Por favor ingrese su contraseña seguida por la tecla de número
broken line without a colon
"""


def _tone(seconds, rate=8000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)


def _tree(root: Path):
    for lang, text, keys in (("en", EN, {"digits/7": 0.6, "digits/1": 0.5, "digits/70": 0.7, "beep": 0.3,
                                         "silence/1": 1.0, "letters/at": 0.4, "agent-pass": 3.0,
                                         "demo-instruct": 31.0, "vm-intro": 2.5}),
                             ("es", ES, {"digits/7": 0.6, "digits/1F": 0.5, "vm-greet": 2.0, "agent-pass": 3.5})):
        sounds = root / "usr/share/asterisk/sounds" / asterisk.LANGUAGES[lang][0]
        for key, seconds in keys.items():
            (sounds / key).parent.mkdir(parents=True, exist_ok=True)
            sf.write(sounds / f"{key}.wav", _tone(seconds), 8000, subtype="PCM_16")
        doc = root / "usr/share/doc" / asterisk.LANGUAGES[lang][1]
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_bytes(gzip.compress(text.encode()))
    return root


def test_prompt_text_rules():
    assert clean_prompt_text("[ascending tones]") is None and clean_prompt_text("(beep)") is None
    assert clean_prompt_text("dollar [$]") == "dollar"
    assert clean_prompt_text('IAX (note: does not say "2")') == "IAX"
    assert clean_prompt_text("Sus saludos [temporales] estan") is None
    assert clean_prompt_text("Thank you.") == "Thank you."


def test_transcripts_skip_and_count(tmp_path):
    root = _tree(tmp_path)
    with pytest.warns(DataWarning) as caught:
        texts, report = parse_transcripts(root / "usr/share/doc" / asterisk.LANGUAGES["es"][1])
    messages = [str(w.message) for w in caught]
    assert any("core-sounds-es.txt.gz:5: skipped (duplicate_key): 'digits/7' already has text 'siete'" in m
               for m in messages)
    assert any("core-sounds-es.txt.gz:8: skipped (malformed)" in m for m in messages)
    assert texts == {"digits/7": "siete", "digits/1f": "una",
                     "agent-pass": "Por favor ingrese su contraseña seguida por la tecla de número"}
    assert report.skipped == {"non_speech": 0, "bracketed": 1, "duplicate_key": 1, "malformed": 1}
    with pytest.raises(AsteriskError, match="nope.txt.gz: transcript file not found"):
        parse_transcripts(tmp_path / "nope.txt.gz")


def test_manifests_from_a_miniature_tree(tmp_path):
    root = _tree(tmp_path / "pkg")
    with pytest.warns(DataWarning):
        summary = build_asterisk_manifests(root, tmp_path / "out")
    assert summary.counts == {"asterisk_en": 6, "asterisk_es": 3, "asterisk_es_en": 2, "asterisk_en_digits": 2,
                              "asterisk_es_digits": 1, "asterisk_en_numbers": 3, "asterisk_es_numbers": 2}
    assert summary.skipped["en"]["non_speech"] == 2 and summary.skipped["en"]["too_long"] == 1
    assert summary.skipped["en"]["no_audio"] == 1
    pairs, _ = load_jsonl_manifest(summary.manifests["asterisk_es_en"])
    by_id = {u.id: u for u in pairs}
    assert by_id["es_en/digits/7"].text == "siete" and by_id["es_en/digits/7"].translation == "seven"
    assert by_id["es_en/agent-pass"].audio.endswith("es_MX_f_Allison/agent-pass.wav")
    en, _ = load_jsonl_manifest(summary.manifests["asterisk_en"])
    assert {u.text for u in en} >= {"at", "Please leave your message."}
    es, _ = load_jsonl_manifest(summary.manifests["asterisk_es"])
    assert any(u.audio.endswith("digits/1F.wav") and u.text == "una" for u in es)  # case-insensitive match
    assert all(u.speaker == "asterisk-allison" and 0 < u.duration < 30 for u in en + es)
    assert "asterisk_en 6" in str(summary)


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def _tar_xz(files: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(path: Path, files: dict) -> Path:
    control = b"Package: fake\nVersion: 1.0\nArchitecture: all\nMaintainer: x <x@y>\nDescription: fake\n"
    path.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n")
                     + _ar_member("control.tar.xz", _tar_xz({"./control": control}))
                     + _ar_member("data.tar.xz", _tar_xz(files)))
    return path


def test_deb_extraction_in_python_and_with_dpkg(tmp_path):
    files = {"./usr/share/doc/x/notes.txt": b"hello\n", "./usr/share/asterisk/sounds/a.wav": b"RIFFdata"}
    deb = _deb(tmp_path / "fake_1.0_all.deb", files)
    extract_deb(deb, tmp_path / "py")
    assert (tmp_path / "py/usr/share/doc/x/notes.txt").read_bytes() == b"hello\n"
    out = unpack_packages([deb], tmp_path / "unpacked")  # dpkg -x here when installed
    assert (out / "usr/share/asterisk/sounds/a.wav").read_bytes() == b"RIFFdata"
    (out / "usr/share/asterisk/sounds/a.wav").unlink()
    unpack_packages([deb], tmp_path / "unpacked")  # stamp: not unpacked twice
    assert not (out / "usr/share/asterisk/sounds/a.wav").exists()
    (tmp_path / "junk.deb").write_bytes(b"not an archive")
    with pytest.raises(AsteriskError, match="junk.deb: not a Debian package"):
        extract_deb(tmp_path / "junk.deb", tmp_path / "junk")


def test_fetch_uses_present_packages_and_explains_failures(tmp_path, monkeypatch):
    for name in asterisk.PACKAGES:
        (tmp_path / f"{name}_1.6.1-1_all.deb").write_bytes(b"!<arch>\n")
    monkeypatch.setattr(asterisk.subprocess, "run", lambda *a, **k: pytest.fail("apt-get must not run"))
    assert [p.name for p in fetch_packages(tmp_path)] == [f"{n}_1.6.1-1_all.deb" for n in asterisk.PACKAGES]
    (tmp_path / "asterisk-core-sounds-es_1.6.1-1_all.deb").unlink()
    monkeypatch.setattr(asterisk.shutil, "which", lambda name: None)
    with pytest.raises(AsteriskError, match="missing asterisk-core-sounds-es and no apt-get here; run `apt-get download"):
        fetch_packages(tmp_path)
    with pytest.raises(AsteriskError, match="missing asterisk-core-sounds-es; run `apt-get download"):
        prepare_asterisk(tmp_path, tmp_path / "out", fetch=False)
