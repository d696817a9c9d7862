"""Prepared samples on disk: every usable row of a manifest rendered once (ids, targets, positions,
audio-code streams, media slots with their encoder inputs) and kept as memory-mapped Arrow shards,
read back a few samples at a time, so a corpus never sits in memory whole and a second run decodes
no media at all.

The storage is Hugging Face ``datasets``: each shard is an Arrow file written by its
``ArrowWriter`` and opened with ``Dataset.from_file`` (memory-mapped); tensors are columns of
int32 lists, a media slot's encoder input is its raw bytes with dtype and shape (exact, any dtype).

One cache is one folder (``<cache_dir>/<manifest stem>-<key>``; the key hashes the manifest, the
task and the processor, see ``omni.data.tasks``)::

    shard-00000.arrow   the samples of manifest rows 0 .. SHARD_ROWS-1 that could be used
    shard-00000.json    written after its shard: rows, samples, that shard's bad rows
    ...
    bad_samples.jsonl   every bad row (row number, files, problem), once the cache is complete
    index.json          written last: what the cache was built from, the shards, the counts

A build holds the folder's lock (``omni.io.exclusive``: a second builder is refused), shows a bar
counting rows and writes each shard atomically, so a killed build resumes at its first missing
shard; it may spread the shards over forked processes (``data.cache_workers``). Opening a cache
checks every shard; a damaged one (truncated, unreadable, the wrong number of samples) is
rebuilt alone.

A frozen tower's output features are cached when its encoder computes them in ``prepare``
(``model.media.audio.precompute``, ``model.media.{image,video}.tokenizer.precompute``); other
towers' inputs are cached, their outputs are not.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets
from datasets.arrow_writer import ArrowWriter

from omni.io import atomic_write_bytes, atomic_write_json, exclusive, fsync_dir, read_json
from omni.media import BAD_FILE_ERRORS
from omni.progress import progress as progress_bar
from omni.sequence import MediaSlot, Rendered

log = logging.getLogger(__name__)

VERSION = 1  # bump when what a cache holds changes: every older cache is then rebuilt
SHARD_ROWS = 1000  # manifest rows per shard: the unit of atomic writes and of resuming a build
INDEX, BAD = "index.json", "bad_samples.jsonl"

_INTS = List(Value("int32"))
FEATURES = Features({
    "row": Value("int64"),  # the manifest row (0-based) the sample came from
    "length": Value("int32"),
    "ids": _INTS, "targets": _INTS,
    "positions": _INTS,  # (3, T), flattened
    "streams": _INTS, "stream_targets": _INTS,  # (K-1, T) flattened, or empty
    "media": List({"start": Value("int32"), "length": Value("int32"), "modality": Value("string"),
                   "data": Value("binary"), "dtype": Value("string"), "shape": _INTS,
                   "labels": _INTS}),  # labels: empty for None
})


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


def _flat(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else t.reshape(-1).tolist()


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def to_example(row: int, r: Rendered) -> dict:
    """A rendered sample as a row of :data:`FEATURES`."""
    flat = _flat
    return {"row": row, "length": len(r), "ids": r.ids.tolist(), "targets": r.targets.tolist(),
            "positions": flat(r.positions), "streams": flat(r.streams),
            "stream_targets": flat(r.stream_targets),
            "media": [{"start": m.start, "length": m.length, "modality": m.modality, "data": _bytes(m.data),
                       "dtype": str(m.data.dtype).removeprefix("torch."), "shape": list(m.data.shape),
                       "labels": flat(m.labels)} for m in r.media]}


def from_example(ex: dict) -> Rendered:
    """:func:`to_example` undone."""
    T, long = ex["length"], _long
    streams = long(ex["streams"]).reshape(-1, T) if ex["streams"] else None
    targets = long(ex["stream_targets"]).reshape(-1, T) if ex["stream_targets"] else None
    media = [MediaSlot(m["start"], m["length"], m["modality"], _tensor(m["data"], m["dtype"], m["shape"]),
                       long(m["labels"]) if m["labels"] else None) for m in ex["media"]]
    return Rendered(long(ex["ids"]), long(ex["targets"]), long(ex["positions"]).reshape(3, T), media,
                    streams, targets)


class Incomplete(Exception):
    """The cache is not (or no longer) complete: build what is missing."""


class CachedSamples:
    """A complete cache, memory-mapped: per sample its ``lengths``, whether it ``has_media`` and
    its manifest ``rows`` (small arrays), and :meth:`get` for the samples themselves. Raises
    :class:`Incomplete` when the folder holds no complete cache, or a damaged shard (which it
    marks for rebuilding)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if not index.is_file():
            raise Incomplete(str(self.folder))
        self.index = read_json(index)
        parts = []
        for k, n in enumerate(self.index["samples"]):
            try:
                part = Dataset.from_file(str(_shard(self.folder, k)))
                ok = part.num_rows == n
            except Exception as e:  # pyarrow's errors for a truncated or foreign file
                ok, n = False, f"unreadable ({type(e).__name__}: {e})"
            if not ok:
                log.warning("%s: damaged (%s samples expected, got %s); rebuilding it",
                            _shard(self.folder, k), self.index["samples"][k], n if isinstance(n, str) else
                            part.num_rows)
                _shard(self.folder, k).with_suffix(".json").unlink(missing_ok=True)
                index.unlink()
                raise Incomplete(str(self.folder))
            parts.append(part)
        self.data = (concatenate_datasets(parts) if parts else
                     Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES))
        table = self.data.data
        self.lengths = table.column("length").to_numpy().astype(np.int64)
        self.rows = table.column("row").to_numpy()
        self.has_media = pc.list_value_length(table.column("media")).to_numpy(zero_copy_only=False) > 0
        self.media_bytes = _media_bytes(table.column("media"))
        self.num_streams, self.num_bad = self.index["num_streams"], self.index["num_bad"]

    def __len__(self) -> int:
        return len(self.lengths)

    def bad_rows(self) -> list[dict]:
        """The rows the build could not use (``bad_samples.jsonl``)."""
        text = (self.folder / BAD).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def get(self, indices: list[int]) -> list[Rendered]:
        cols = self.data[list(indices)]
        return [from_example({k: cols[k][i] for k in cols}) for i in range(len(indices))]


def _media_bytes(column) -> np.ndarray:
    """Per sample, the bytes of its media slots' encoder inputs (the size the length buckets sort
    audio by), from the Arrow offsets alone: no media bytes are read."""
    out = []
    for chunk in column.chunks:
        data = pc.struct_field(pc.list_flatten(chunk), "data")
        sizes = np.concatenate([[0], np.cumsum(pc.binary_length(data).to_numpy(zero_copy_only=False))])
        offsets = chunk.offsets.to_numpy()
        offsets = offsets - offsets[0]
        out.append(sizes[offsets[1:]] - sizes[offsets[:-1]])
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def _shard(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.arrow"


def _write_shard(path: Path, examples: Iterable[dict]) -> int:
    """The examples as an Arrow file at ``path``, written beside it and renamed when complete."""
    tmp = path.with_name(f".tmp-{path.name}")
    writer = ArrowWriter(features=FEATURES, path=str(tmp))
    try:
        for ex in examples:
            writer.write(ex)
        n, _ = writer.finalize()
    finally:
        writer.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return n


_JOB: tuple = ()  # (render, on_bad) of the build in progress: forked build workers inherit it


def _build_shard(folder: Path, k: int, chunk: list, tick: Callable[[int], object] | None = None) -> int:
    """Shard ``k`` from its manifest rows ``chunk`` ((n, row) pairs) through ``_JOB``, then its
    ``.json`` (which marks it done); returns the rows done. ``tick(1)`` after each row."""
    render, on_bad = _JOB
    bad, streams = [], [0]
    threads = torch.get_num_threads()

    def examples():
        for n, row in chunk:
            try:
                r = render(row)
            except BAD_FILE_ERRORS as e:
                bad.append(on_bad(n, row, e))
            else:
                streams[0] = max(streams[0], 0 if r.streams is None else r.streams.shape[0])
                yield to_example(n, r)
            if tick is not None:
                tick(1)

    torch.set_num_threads(1)  # one sample's small tensors gain nothing from more (workers: more processes)
    try:
        n = _write_shard(_shard(folder, k), examples())
    finally:
        torch.set_num_threads(threads)
    atomic_write_json(_shard(folder, k).with_suffix(".json"),
                      {"rows": len(chunk), "samples": n, "bad": bad, "num_streams": streams[0]})
    return len(chunk)


def build(folder: Path, rows: Iterable[dict], render: Callable[[dict], Rendered],
          on_bad: Callable[[int, dict, Exception], dict], meta: dict, total: int | None = None,
          desc: str = "", progress: bool | None = False, workers: int = 0,
          unit: str = "row") -> CachedSamples:
    """The cache in ``folder`` for the manifest ``rows``, built where missing: each row through
    ``render`` (a ``BAD_FILE_ERRORS`` error makes it a bad row: ``on_bad(n, row, error)`` logs it
    and returns its entry for ``bad_samples.jsonl``, or raises to stop the build). ``meta``
    (what the cache was built from) goes into ``index.json``. Rows are rendered with one torch
    thread (under load, two threads' small per-sample ops made an audio build 20-40x slower);
    ``workers`` > 0: shards are built by that many forked processes, else in this one."""
    global _JOB
    folder = Path(folder)
    try:
        return CachedSamples(folder)
    except Incomplete:
        pass
    with exclusive(folder, "sample cache"):
        try:  # read again under the lock: another builder may have just finished
            return CachedSamples(folder)
        except Incomplete:
            pass
        for tmp in folder.glob(".tmp-*"):
            tmp.unlink()
        bar = progress_bar(total=total, desc=desc, unit=unit, enabled=progress)  # unit: what a row is
        _JOB = (render, on_bad)
        pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
                if workers else None)
        pending, numbered, shards = [], enumerate(rows), 0
        try:
            while chunk := list(itertools.islice(numbered, SHARD_ROWS)):
                k, shards = shards, shards + 1
                if _shard(folder, k).with_suffix(".json").is_file():
                    bar.update(len(chunk))
                elif pool is None:
                    _build_shard(folder, k, chunk, bar.update)
                else:
                    pending.append(pool.submit(_build_shard, folder, k, chunk))
                    while len(pending) > 2 * workers:  # a bounded number of shards' rows in flight
                        bar.update(pending.pop(0).result())
            for job in pending:
                bar.update(job.result())
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            _JOB = ()
        bar.close()
        infos = [read_json(_shard(folder, k).with_suffix(".json")) for k in range(shards)]
        bad = [b for info in infos for b in info["bad"]]
        atomic_write_bytes(folder / BAD, "".join(json.dumps(b) + "\n" for b in bad).encode())
        atomic_write_json(folder / INDEX, {
            **meta, "version": VERSION, "samples": [i["samples"] for i in infos], "num_bad": len(bad),
            "num_streams": max((i["num_streams"] for i in infos), default=0)})
    return CachedSamples(folder)
