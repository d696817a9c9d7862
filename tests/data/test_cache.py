"""Prepared-sample caches (omni/data/cache.py) and the lazily packed datasets that read them:
the same rows as packing everything in memory, a warm run that prepares nothing, resumable and
locked builds, damaged shards rebuilt alone, bad rows listed beside the cache."""

import json
import random

import pytest
import torch

from omni.data import cache
from omni.data.images import build_images_corpus
from omni.data.tasks import PackedDataset, RenderedSamples, TaskDataset, TaskSpec, cache_key
from omni.io import LockedError, exclusive, write_jsonl
from omni.model.backbone import backbone_config, default_mrope_section
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline
from omni.processor import Processor
from omni.sequence import MediaSlot, Rendered, pack

IMAGE_MEDIA = {"image": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
                         "connector": {"kind": "mlp"}}}


def _same_rows(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("ids", "targets", "positions", "doc_ids", "streams", "stream_targets", "loss_weights"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            assert u is None or torch.equal(u, v), name
        assert [(m.start, m.length, m.modality) for m in x.media] == [(m.start, m.length, m.modality)
                                                                        for m in y.media]
        assert all(torch.equal(m.data, n.data) for m, n in zip(x.media, y.media))


def _random_samples(n, seed, streams=True):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        T = rng.randint(1, 40)
        media = [MediaSlot(1, 2, "image", torch.randn(3, 4))] if rng.random() < 0.3 and T >= 3 else []
        audio = streams and rng.random() < 0.3
        out.append(Rendered(torch.randint(0, 99, (T,)), torch.randint(0, 99, (T,)),
                            torch.arange(T).expand(3, T) + rng.randint(0, 5), media,
                            torch.randint(0, 9, (2, T)) if audio else None,
                            torch.randint(0, 9, (2, T)) if audio else None))
    return out


@pytest.mark.parametrize("split", [True, False])
def test_rows_planned_from_lengths_are_the_rows_pack_makes(split):
    for seed in range(5):
        samples = [s for s in _random_samples(60, seed) if not (s.media and len(s) > 16)]
        order = ([0] * len(samples), range(len(samples)))
        ds = PackedDataset([RenderedSamples(samples)], order, 16, 0, split)
        _same_rows(list(ds), pack(samples, 16, 0, split_across_rows=split))
        assert ds.num_tokens == sum(len(s) for s in samples)


def test_a_cached_dataset_has_the_in_memory_rows_and_a_warm_one_prepares_nothing(
        tiny_corpus, debug_model, tmp_path, monkeypatch):
    spec, m = TaskSpec("text"), tiny_corpus / "train.jsonl"
    in_memory = TaskDataset(m, spec, debug_model, seq_len=64)
    cold = TaskDataset(m, spec, debug_model, seq_len=64, cache_dir=tmp_path)
    _same_rows(list(cold), list(in_memory))
    (folder,) = tmp_path.glob("train-*")
    assert (folder / cache.INDEX).is_file() and (folder / cache.BAD).read_text() == ""
    monkeypatch.setattr(Processor, "render", lambda *a, **k: pytest.fail("a warm cache rendered a row"))
    warm = TaskDataset(m, spec, debug_model, seq_len=64, cache_dir=tmp_path)
    _same_rows(list(warm), list(in_memory))
    assert (warm.num_docs, warm.num_tokens, len(warm)) == (in_memory.num_docs, in_memory.num_tokens,
                                                           len(in_memory))


def image_corpus_and_model(tmp_path, fake_stamps, text_tokenizer) -> Pipeline:
    """An images corpus (every row in train) under ``tmp_path / "images"`` and a debug M-RoPE model
    that reads images."""
    build_images_corpus(tmp_path / "images", stamps_dir=fake_stamps, max_size=48, val_fraction=0.0,
                        test_fraction=0.0)
    cfg = backbone_config("debug", max_seq_len=128)
    cfg.mrope_section = default_mrope_section(cfg.head_dim)
    model = Pipeline(build_model(cfg, text_tokenizer.vocab, seed=0, media=IMAGE_MEDIA),
                     tokenizer=text_tokenizer)
    return model

def test_media_rows_round_trip_exactly_and_too_long_ones_are_bad(fake_stamps, tmp_path, text_tokenizer):
    model = image_corpus_and_model(tmp_path, fake_stamps, text_tokenizer)
    m = tmp_path / "images" / "train.jsonl"
    spec = TaskSpec("caption", "image", "caption", "Caption:")
    in_memory = TaskDataset(m, spec, model, seq_len=64)
    cached = TaskDataset(m, spec, model, seq_len=64, cache_dir=tmp_path / "cache")
    _same_rows(list(cached), list(in_memory))
    assert cached.num_bad == 0 and sum(len(r.media) for r in cached) == cached.num_docs
    short = TaskDataset(m, spec, model, seq_len=26, cache_dir=tmp_path / "cache")  # the same cache
    assert 0 < short.num_bad == cached.num_docs - short.num_docs
    with pytest.raises(ValueError, match=r"row \d+: \d+ tokens do not fit data.seq_len=26"):
        TaskDataset(m, spec, model, seq_len=26, cache_dir=tmp_path / "cache", on_bad_sample="error")


def test_the_key_follows_the_manifest_the_task_and_the_processor(tiny_corpus, debug_model, text_tokenizer,
                                                                 tmp_path):
    m = tmp_path / "train.jsonl"
    m.write_bytes((tiny_corpus / "train.jsonl").read_bytes())
    key = cache_key(m, TaskSpec("text"), debug_model.processor)
    assert cache_key(m, TaskSpec("text"), debug_model.processor) == key
    assert cache_key(m, TaskSpec("chat"), debug_model.processor) != key
    other = Processor(debug_model.processor.vocab, text_tokenizer,
                      render_options={**debug_model.processor.render_options, "loss_on": "all"})
    assert cache_key(m, TaskSpec("text"), other) != key
    m.write_bytes(m.read_bytes() + b'{"text": "one more"}\n')
    assert cache_key(m, TaskSpec("text"), debug_model.processor) != key


class Killed(BaseException):
    pass


def _build(folder, rows, calls, kill_at=None):
    def render(row):
        calls.append(row["i"])
        if row["i"] == kill_at:
            raise Killed()
        if row["i"] % 5 == 4:
            raise ValueError("no usable text")
        T = 1 + row["i"] % 7
        return Rendered(torch.arange(T), torch.arange(T), torch.zeros(3, T, dtype=torch.long))

    return cache.build(folder, iter(rows), render, lambda n, row, e: {"row": n + 1, "error": str(e)}, {})


def test_a_killed_build_resumes_at_its_first_missing_shard_and_a_damaged_shard_is_rebuilt_alone(
        tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_ROWS", 4)
    rows, calls = [{"i": i} for i in range(10)], []
    with pytest.raises(Killed):
        _build(tmp_path, rows, calls, kill_at=6)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.arrow", "shard-00000.json"]
    calls.clear()
    samples = _build(tmp_path, rows, calls)
    assert calls == list(range(4, 10))  # shard 0 was kept
    assert len(samples) == 8 and samples.num_bad == 2
    assert [b["row"] for b in samples.bad_rows()] == [5, 10]
    assert [len(r) for r in samples.get([0, 7])] == [1, 2]  # rows 0 and 8
    shard = tmp_path / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:100])  # damaged
    calls.clear()
    samples = _build(tmp_path, rows, calls)
    assert calls == [4, 5, 6, 7] and len(samples) == 8
    calls.clear()
    _build(tmp_path, rows, calls)
    assert calls == []


def test_a_second_builder_is_refused(tmp_path):
    with exclusive(tmp_path, "sample cache"):
        with pytest.raises(LockedError, match="sample cache is being written by another process"):
            _build(tmp_path, [{"i": 0}], [])


def test_bad_rows_are_listed_beside_the_cache_and_raise_under_on_bad_sample_error(tiny_corpus, debug_model,
                                                                                   tmp_path):
    rows = [json.loads(x) for x in (tiny_corpus / "train.jsonl").read_text().splitlines()][:5]
    m = tmp_path / "train.jsonl"
    write_jsonl(m, rows[:2] + [{"text": ""}] + rows[2:])
    ds = TaskDataset(m, TaskSpec("text"), debug_model, seq_len=32, cache_dir=tmp_path / "cache")
    assert ds.num_bad == 1 and ds.num_docs == 5
    (bad,) = (tmp_path / "cache").glob(f"*/{cache.BAD}")
    assert [json.loads(x)["row"] for x in bad.read_text().splitlines()] == [3]
    with pytest.raises(ValueError, match=r"train.jsonl: row 3: no non-empty string field 'text'"):
        TaskDataset(m, TaskSpec("text"), debug_model, seq_len=32, cache_dir=tmp_path / "cache",
                    on_bad_sample="error")


def test_shards_built_by_several_processes_are_the_ones_one_process_builds(tiny_corpus, debug_model, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(cache, "SHARD_ROWS", 7)
    spec, m = TaskSpec("text"), tiny_corpus / "train.jsonl"
    one = TaskDataset(m, spec, debug_model, seq_len=64, cache_dir=tmp_path / "one")
    several = TaskDataset(m, spec, debug_model, seq_len=64, cache_dir=tmp_path / "several", cache_workers=2)
    assert len(list((tmp_path / "several").glob("*/shard-*.arrow"))) > 2
    _same_rows(list(several), list(one))


def test_rows_are_rendered_with_one_torch_thread_and_the_process_keeps_its_own(tmp_path):
    """Per-sample preprocessing runs single-threaded in the training process too (as in the build
    workers): the build is not slowed by intra-op threads waiting on a busy machine's cores."""
    seen = []

    def render(row):
        seen.append(torch.get_num_threads())
        return Rendered(torch.arange(3), torch.arange(3), torch.zeros(3, 3, dtype=torch.long))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cache.build(tmp_path / "c", iter([{"i": i} for i in range(3)]), render, lambda *a: {}, {})
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
