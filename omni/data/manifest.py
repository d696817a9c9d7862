"""Manifests: the rows a task reads, from one JSONL file or from shards (a glob of JSONL, Parquet
or Arrow files), so a corpus can arrive in pieces and be larger than the disk a run starts on.

A row is one JSON object (JSONL) or one table row (Parquet, Arrow: read by ``pyarrow``, a record
batch at a time, its columns as the row's fields). Media paths in a row are relative to the folder
of the file that holds the row. Shards are read in the order of their sorted paths; a row is named
in messages by its file and its row number there (1-based).

A recipe names a split's manifest with ``data.files`` under ``data.path`` (``{split}.jsonl`` by
default; ``{split}/*.parquet`` or ``{split}-*.jsonl`` for shards).
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omni.io import atomic_write_json, read_jsonl

SUFFIXES = (".jsonl", ".parquet", ".arrow")
DIGESTS = "digests.json"  # beside the caches: each shard's sha256, reused while its size and mtime hold


def has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")



def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

@dataclass(frozen=True)
class Manifest:
    """The files of one manifest (sorted), and the name (``stem``) its caches are filed under."""

    files: tuple[Path, ...]
    stem: str
    pattern: str = ""

    @classmethod
    def of(cls, path: str | Path | Manifest, stem: str | None = None) -> Manifest:
        """A manifest file, or a glob of them (``data/train-*.parquet``)."""
        if isinstance(path, Manifest):
            return path
        text = str(path)
        if has_glob(text):
            files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
            if not files:
                raise ValueError(f"{text}: no manifest files match")
            odd = [f for f in files if f.suffix not in SUFFIXES]
            if odd:
                raise ValueError(f"{odd[0]}: a manifest is a {', '.join(SUFFIXES)} file")
            name = Path(text).name  # train-*.parquet, */train.parquet: "train"
            name = (name.split("*")[0].split("?")[0].split("[")[0].strip("-_.") if has_glob(name)
                    else Path(name).stem)
            return cls(tuple(files), stem or name or Path(text).parent.name or "manifest", text)
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"{path}: manifest not found")
        if path.suffix not in SUFFIXES:
            raise ValueError(f"{path}: a manifest is a {', '.join(SUFFIXES)} file")
        return cls((path,), stem or path.stem, text)

    @classmethod
    def split(cls, folder: str | Path, files: str, split: str) -> Manifest:
        """Split ``split`` of a task's data: ``files`` (``{split}`` replaced) under ``folder``."""
        return cls.of(Path(folder) / files.format(split=split), stem=split)

    def __str__(self) -> str:
        return self.pattern or str(self.files[0])

    @property
    def held_out(self) -> bool:
        return self.stem != "train"

    def rows(self, max_rows: int | None = None) -> Iterator[tuple[Path, int, dict]]:
        """(file, row number there (0-based), row) for the first ``max_rows`` rows of all the files."""
        n = 0
        for f in self.files:
            for k, row in enumerate(_file_rows(f)):
                if max_rows is not None and n >= max_rows:
                    return
                yield f, k, row
                n += 1

    def count(self) -> int:
        """Rows, for a progress bar: a JSONL file's lines, a table's rows (from its metadata)."""
        return sum(_file_count(f) for f in self.files)

    def locate(self, n: int) -> tuple[Path, int]:
        """The file holding row ``n`` of the whole manifest (0-based), and its row number there."""
        if len(self.files) == 1:
            return self.files[0], n
        for f in self.files:
            k = sum(1 for _ in _file_rows(f))
            if n < k:
                return f, n
            n -= k
        raise IndexError(n)

    def digest(self, memo_dir: str | Path | None = None) -> str | list[str]:
        """The sha256 of each file's bytes (one file: its digest alone, so a single JSONL manifest's
        caches keep the key they had). With ``memo_dir``, a digest is remembered there with the
        file's size and modification time and reused while both hold, so a warm start over a large
        sharded corpus stats its files instead of reading them again."""
        memo_file = Path(memo_dir) / DIGESTS if memo_dir is not None else None
        memo = _read_memo(memo_file)
        out, changed = [], False
        for f in self.files:
            st, key = f.stat(), str(f.resolve())
            stamp = [st.st_size, st.st_mtime_ns]
            if memo.get(key, {}).get("stamp") != stamp:
                memo[key] = {"stamp": stamp, "sha256": file_digest(f)}
                changed = True
            out.append(memo[key]["sha256"])
        if memo_file is not None and changed:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo_file, memo)
        return out[0] if len(out) == 1 else out


def _read_memo(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged memo: every digest is computed again
    return memo if isinstance(memo, dict) else {}


def _table_batches(path: Path):
    """A Parquet or Arrow file's record batches, read one at a time (an Arrow file memory-mapped;
    the IPC file format or the stream format ``datasets`` writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
            return
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        yield from batches
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable {path.suffix[1:]} file ({type(e).__name__}: {e})") from None


def _file_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".jsonl":
        yield from read_jsonl(path)
        return
    for batch in _table_batches(path):
        yield from batch.to_pylist()


def _file_count(path: Path) -> int:
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow's errors for a foreign file
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    return sum(b.num_rows for b in _table_batches(path))

