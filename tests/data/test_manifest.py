"""Sharded manifests (omni/data/manifest.py): a glob of JSONL, Parquet or Arrow files reads as the
one JSONL file it was cut from, media paths are relative to each shard's folder, the cache key
covers every shard's bytes (a digest reused while a file's size and mtime hold), and bad rows and
unreadable files are named by their shard."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omni.config import DataConfig, TaskData
from omni.data import cache, manifest
from omni.data.manifest import Manifest
from omni.data.tasks import TaskDataset, TaskSpec, cache_key, dataset_for, split_manifest
from omni.io import write_jsonl
from tests.data.test_cache import _same_rows, image_corpus_and_model


def _rows(path, n=None):
    return [json.loads(x) for x in path.read_text().splitlines()][:n]


def _write(path, rows):
    """``rows`` as a JSONL, Parquet or Arrow (IPC file) manifest, by ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        write_jsonl(path, rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    else:
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_file(str(path), table.schema) as w:
            for batch in table.to_batches(max_chunksize=7):
                w.write_batch(batch)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".arrow"])
def test_a_glob_of_shards_reads_as_the_file_it_was_cut_from(tiny_corpus, debug_model, tmp_path, suffix):
    rows = _rows(tiny_corpus / "train.jsonl", 40)
    write_jsonl(tmp_path / "whole.jsonl", rows)
    for k, (a, b) in enumerate([(0, 15), (15, 31), (31, 40)]):
        _write(tmp_path / "train" / f"part-{k:02d}{suffix}", rows[a:b])
    m = Manifest.split(tmp_path, f"{{split}}/part-*{suffix}", "train")
    assert len(m.files) == 3 and m.stem == "train" and m.count() == 40
    assert [r for *_, r in m.rows()] == rows and [r for *_, r in m.rows(20)] == rows[:20]
    assert m.locate(33) == (m.files[2], 2)
    spec = TaskSpec("text")
    whole = TaskDataset(tmp_path / "whole.jsonl", spec, debug_model, seq_len=64)
    sharded = TaskDataset(m, spec, debug_model, seq_len=64, cache_dir=tmp_path / "cache")
    _same_rows(list(sharded), list(whole))
    (folder,) = (tmp_path / "cache").glob("train-*")
    assert json.loads((folder / cache.INDEX).read_text())["files"] == [str(f) for f in m.files]


def test_the_key_covers_every_shard_and_reuses_a_digest_while_size_and_mtime_hold(
        tiny_corpus, debug_model, tmp_path, monkeypatch):
    rows = _rows(tiny_corpus / "train.jsonl", 20)
    for k in range(2):
        _write(tmp_path / f"train-{k}.parquet", rows[10 * k:10 * k + 10])
    one = tmp_path / "one.jsonl"
    write_jsonl(one, rows)
    proc, spec, glob = debug_model.processor, TaskSpec("text"), str(tmp_path / "train-*.parquet")
    # one file: the key it had before manifests could be sharded (its caches stay valid)
    assert Manifest.of(one).digest() == manifest.file_digest(one)
    key = cache_key(glob, spec, proc, memo_dir=tmp_path / "memo")
    assert (tmp_path / "memo" / manifest.DIGESTS).is_file()
    monkeypatch.setattr(manifest, "file_digest", lambda f: pytest.fail(f"{f} read again"))
    assert cache_key(glob, spec, proc, memo_dir=tmp_path / "memo") == key
    monkeypatch.undo()
    _write(tmp_path / "train-1.parquet", rows[10:19])  # one shard changed: a new size or mtime
    assert cache_key(glob, spec, proc, memo_dir=tmp_path / "memo") != key
    _write(tmp_path / "train-1.parquet", rows[10:20])  # the same bytes again: the same key
    st = os.stat(tmp_path / "train-1.parquet")
    os.utime(tmp_path / "train-1.parquet", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(glob, spec, proc, memo_dir=tmp_path / "memo") == key == cache_key(glob, spec, proc)


def test_media_paths_are_relative_to_each_shard_and_bad_rows_name_their_shard(fake_stamps, tmp_path,
                                                                              text_tokenizer):
    model = image_corpus_and_model(tmp_path, fake_stamps, text_tokenizer)
    spec = TaskSpec("caption", "image", "caption", "Caption:")
    rows = _rows(tmp_path / "images" / "train.jsonl")
    moved = [{**r, "image": f"../../images/{r['image']}"} for r in rows]  # from shards/<k>/ back to images/
    half = len(rows) // 2
    _write(tmp_path / "shards" / "0" / "train.parquet", moved[:half])
    gone = {"image": "gone.png", "caption": "x"}
    _write(tmp_path / "shards" / "1" / "train.parquet", moved[half:] + [gone])
    m = Manifest.of(tmp_path / "shards" / "*" / "train.parquet")
    whole = TaskDataset(tmp_path / "images" / "train.jsonl", spec, model, seq_len=64)
    sharded = TaskDataset(m, spec, model, seq_len=64, cache_dir=tmp_path / "cache")
    _same_rows(list(sharded), list(whole))
    assert sharded.num_bad == 1
    (bad,) = (tmp_path / "cache").glob(f"train-*/{cache.BAD}")
    entry = json.loads(bad.read_text())
    assert entry["manifest"] == str(m.files[1]) and entry["row"] == len(rows) - half + 1
    where = rf"shards/1/train.parquet: row {len(rows) - half + 1}: \S*gone.png: file not found"
    with pytest.raises(ValueError, match=where):
        TaskDataset(m, spec, model, seq_len=64, cache_dir=tmp_path / "cache", on_bad_sample="error")


def test_unreadable_or_missing_shards_are_named(tmp_path):
    (tmp_path / "train-0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"train-0.parquet: not a readable parquet file"):
        Manifest.of(tmp_path / "train-*.parquet").count()
    with pytest.raises(ValueError, match=r"train-0.parquet: not a readable parquet file"):
        list(Manifest.of(tmp_path / "train-*.parquet").rows())
    (tmp_path / "train-1.arrow").write_bytes(b"not arrow")
    with pytest.raises(ValueError, match=r"train-1.arrow: not a readable arrow file"):
        list(Manifest.of(tmp_path / "train-1.arrow").rows())
    with pytest.raises(ValueError, match=r"val-\*.parquet: no manifest files match"):
        Manifest.of(tmp_path / "val-*.parquet")
    with pytest.raises(ValueError, match=r"train.csv: a manifest is a .jsonl, .parquet, .arrow file"):
        (tmp_path / "train.csv").write_text("a,b\n")
        Manifest.of(tmp_path / "train.csv")


def test_a_recipe_names_its_shards_with_data_files(tiny_corpus, debug_model, tmp_path):
    rows = _rows(tiny_corpus / "train.jsonl", 30)
    for split, part in (("train", rows[:20]), ("val", rows[20:])):
        for k in range(2):
            _write(tmp_path / split / f"{k}.parquet", part[k::2])
    data = DataConfig(path=str(tmp_path), files="{split}/*.parquet", seq_len=64)
    data.validate()
    assert split_manifest(data, "val").files == tuple(tmp_path / "val" / f"{k}.parquet" for k in range(2))
    ds = dataset_for(data, "train", debug_model.processor)
    assert ds.num_docs == 20 and (tmp_path / "cache").is_dir()
    for bad in ("train/*.parquet", "{split}.csv"):
        with pytest.raises(ValueError, match=r"data.files must name each split's manifest"):
            TaskData(files=bad).validate()


def test_a_tokenizer_corpus_may_be_shards(tmp_path):
    from omni.tokenizers.text import corpus_texts

    _write(tmp_path / "train-0.parquet", [{"text": "one"}, {"text": "two"}])
    _write(tmp_path / "train-1.jsonl", [{"text": "three"}])
    _write(tmp_path / "train-2.arrow", [{"caption": "four"}])
    assert list(corpus_texts(tmp_path / "train-[01].*")) == ["one", "two", "three"]
    assert list(corpus_texts(Manifest.of(tmp_path / "train-2.arrow"), "caption")) == ["four"]
    with pytest.raises(ValueError, match=r"train-2.arrow: row 1 has no string field 'text'"):
        list(corpus_texts(tmp_path / "train-*"))
