import json

import pytest
import torch

from omni.data.tasks import TaskDataset, TaskSpec, collate
from omni.data.text import _split_of, build_text_corpus, file_documents, wiki_documents
from omni.io import read_jsonl
from omni.sequence import IGNORE, Sample, render


def _paragraphs(tiny_corpus, n=40):
    rows = list(read_jsonl(tiny_corpus / "train.jsonl"))[:n]
    return [r["text"].replace("\n", " ") for r in rows]


def _manifests(out):
    return {s: list(read_jsonl(out / f"{s}.jsonl")) for s in ("train", "val", "test")}


def test_text_file_paragraphs(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes("First paragraph,\nstill first.\r\n\r\nSecond one.\n\n\n\n  Third: café.  \n".encode())
    docs = file_documents(p)
    assert docs == [{"id": "notes.txt:0", "text": "First paragraph,\nstill first."},
                    {"id": "notes.txt:1", "text": "Second one."},
                    {"id": "notes.txt:3", "text": "Third: café."}]


def test_build_from_a_text_file(tmp_path, tiny_corpus):
    paras = _paragraphs(tiny_corpus)
    src = tmp_path / "book.txt"
    src.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    counts = build_text_corpus(tmp_path / "out", source=str(src), val_fraction=0.2, test_fraction=0.2)
    m = _manifests(tmp_path / "out")
    assert counts == {s: len(rows) for s, rows in m.items()}
    assert sum(counts.values()) == 40 and min(counts.values()) > 0
    assert sorted(r["text"] for rows in m.values() for r in rows) == sorted(paras)
    for split, rows in m.items():
        for r in rows:
            assert _split_of(r["id"], 0.2, 0.2) == split


def test_build_from_jsonl(tmp_path):
    src = tmp_path / "docs.jsonl"
    rows = [{"id": f"doc{i}", "text": f"  Document number {i}.  "} for i in range(30)]
    rows += [{"text": "no id here"}, {"id": "blank", "text": "   "}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    counts = build_text_corpus(tmp_path / "out", source=str(src), val_fraction=0.1, test_fraction=0.1)
    m = _manifests(tmp_path / "out")
    assert sum(counts.values()) == 31  # the blank document is dropped
    by_id = {r["id"]: r["text"] for rows in m.values() for r in rows}
    assert by_id["doc7"] == "Document number 7." and by_id["30"] == "no id here"
    assert "blank" not in by_id


def test_build_from_wiki(tmp_path):
    counts = build_text_corpus(tmp_path / "out", source="wiki", max_docs=50)
    assert sum(counts.values()) == 50
    first = wiki_documents()[:50]
    got = {r["id"]: r["text"] for rows in _manifests(tmp_path / "out").values() for r in rows}
    assert got == {d["id"]: d["text"] for d in first}


def test_splits_are_stable_when_the_corpus_grows_or_reorders(tmp_path):
    def build(name, ids):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"id": i, "text": f"text of {i}"}) + "\n" for i in ids))
        build_text_corpus(tmp_path / name, source=str(src), val_fraction=0.25, test_fraction=0.25)
        return {r["id"]: split for split, rows in _manifests(tmp_path / name).items() for r in rows}

    small = build("small", [f"d{i}" for i in range(20)])
    big = build("big", [f"d{i}" for i in range(60)][::-1])
    assert set(small.values()) == {"train", "val", "test"}
    assert {k: big[k] for k in small} == small


@pytest.mark.parametrize("case", ["non_utf8_txt", "non_utf8_jsonl", "empty_txt", "blank_txt", "empty_jsonl",
                                  "missing", "no_text_field"])
def test_bad_sources_name_the_file(tmp_path, case):
    name = {"non_utf8_jsonl": "c.jsonl", "empty_jsonl": "c.jsonl",
            "no_text_field": "c.jsonl"}.get(case, "c.txt")
    p = tmp_path / name
    content = {"non_utf8_txt": b"caf\xe9 au lait\n",
               "non_utf8_jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
               "empty_txt": b"", "blank_txt": b"\n  \n\n", "empty_jsonl": b"", "missing": None,
               "no_text_field": b'{"text": "ok"}\n{"body": "x"}\n'}[case]
    if content is not None:
        p.write_bytes(content)
    expect = {"non_utf8_txt": "not UTF-8", "non_utf8_jsonl": "not UTF-8", "empty_txt": "empty",
              "blank_txt": "empty", "empty_jsonl": "empty", "missing": "not found",
              "no_text_field": "row 2 has no string field"}[case]
    with pytest.raises(ValueError, match=expect) as e:
        build_text_corpus(tmp_path / "out", source=str(p))
    assert str(p) in str(e.value)
    assert not (tmp_path / "out").exists()


def _write_manifest(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


BAD_ROWS = [{"id": "a", "text": "Zero is a number."}, {"id": "b"}, {"id": "c", "text": "   "},
            {"id": "d", "text": 5}, {"id": "e", "text": "One follows zero."}]


def test_packed_dataset_skips_bad_rows(tmp_path, text_tokenizer, debug_model):
    m = _write_manifest(tmp_path / "train.jsonl", BAD_ROWS)
    ds = TaskDataset(m, TaskSpec("text"), debug_model, seq_len=8)
    assert ds.num_bad == 3 and ds.num_docs == 2
    samples = [render(Sample.document(t), text_tokenizer) for t in ("Zero is a number.", "One follows zero.")]
    assert ds.num_tokens == sum(len(s) for s in samples)
    real = torch.cat([r.ids[r.doc_ids >= 0] for r in ds])
    assert real.tolist() == torch.cat([s.ids for s in samples]).tolist()
    assert len(ds) == -(-ds.num_tokens // 8)


def test_packed_dataset_error_mode_names_manifest_and_row(tmp_path, text_tokenizer, debug_model):
    m = _write_manifest(tmp_path / "train.jsonl", BAD_ROWS)
    with pytest.raises(ValueError, match="row 2: no non-empty string field 'text'") as e:
        TaskDataset(m, TaskSpec("text"), debug_model, seq_len=8, on_bad_sample="error")
    assert str(m) in str(e.value)


def test_packed_dataset_with_no_usable_rows(tmp_path, text_tokenizer, debug_model):
    m = _write_manifest(tmp_path / "train.jsonl", BAD_ROWS[1:4])
    with pytest.raises(ValueError, match="no usable rows") as e:
        TaskDataset(m, TaskSpec("text"), debug_model, seq_len=8)
    assert str(m) in str(e.value)


def test_packed_dataset_on_the_corpus_and_collate(tiny_corpus, text_tokenizer, debug_model):
    ds = TaskDataset(tiny_corpus / "val.jsonl", TaskSpec("text"), debug_model, seq_len=64)
    assert ds.num_docs == 20 and ds.num_bad == 0 and len(ds) == -(-ds.num_tokens // 64)
    batch = collate([ds[0], ds[1], ds[len(ds) - 1]])
    assert set(batch) == {"input_ids", "targets", "positions", "doc_ids"}
    for v in batch.values():
        assert v.shape == (3, 64) and v.dtype == torch.long
    assert torch.equal(batch["positions"][0], ds[0].positions[0])
    assert (batch["targets"][batch["doc_ids"] == -1] == IGNORE).all()


def test_a_second_build_of_a_folder_being_built_is_refused(tmp_path, lock_held_elsewhere, folder_files):
    from omni.io import LockedError

    src = tmp_path / "book.txt"
    src.write_text("\n\n".join(f"Paragraph {i}." for i in range(20)), encoding="utf-8")
    out = tmp_path / "out"
    build_text_corpus(out, source=str(src))
    before = folder_files(out)
    src.write_text("\n\n".join(f"Another paragraph {i}." for i in range(20)), encoding="utf-8")
    with lock_held_elsewhere(out, "text corpus") as pid:
        with pytest.raises(LockedError,
                           match=rf"this text corpus is being written by another process \(pid {pid} "):
            build_text_corpus(out, source=str(src))
    assert folder_files(out) == before
