"""Length-bucketed sampling (data.length_buckets): samples grouped by length and packed per bucket,
each micro-batch drawn from one bucket, every sample once per epoch, deterministic under the seed
and exact on resume; padding falls on clips of mixed lengths."""

import numpy as np
import pytest
import torch

from omni.config import DataConfig
from omni.data import cache
from omni.data.tasks import PackedDataset, RenderedSamples, dataset_for, length_buckets
from omni.sequence import MediaSlot, Rendered
from omni.train.loop import RowStream


class Lengths:
    """A source of samples known by their lengths alone (what a packing plan is made from)."""

    def __init__(self, lengths, media=True):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.has_media = np.full(len(self.lengths), media)
        self.num_streams = 0


def _clips(n=500, seed=0):
    rng = np.random.default_rng(seed)  # short commands and long sentences, as in the speech corpus
    return np.where(rng.random(n) < 0.5, rng.integers(20, 60, n), rng.integers(80, 240, n))


def test_buckets_are_a_seeded_permutation_of_equal_count_length_ranges():
    lengths = _clips()
    order, bucket = length_buckets(lengths, 4, seed=1)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    assert (np.diff(bucket) >= 0).all() and np.bincount(bucket).min() > len(lengths) // 4 - 20
    spans = [(lengths[order[bucket == b]].min(), lengths[order[bucket == b]].max()) for b in range(4)]
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # the ranges do not overlap
    assert (length_buckets(lengths, 4, seed=1)[0] == order).all()
    assert not (length_buckets(lengths, 4, seed=2)[0] == order).all()


def _pieces(ds):
    return sorted(ds.source[ds.docs].tolist()), sorted(ds.index[ds.docs].tolist())


def test_each_bucket_is_packed_on_its_own_and_every_sample_is_in_one_row():
    lengths = _clips()
    plain = PackedDataset([Lengths(lengths)], (np.zeros(500), np.arange(500)), 256, 0, False)
    ds = PackedDataset([Lengths(lengths)], (np.zeros(500), np.arange(500)), 256, 0, False, buckets=4, seed=0)
    assert plain.row_buckets is None and len(ds.row_buckets) == len(ds)
    assert _pieces(ds)[1] == list(range(500)) == _pieces(plain)[1]  # every sample once, whole
    for r in range(len(ds)):
        samples = ds.index[ds.docs[ds.starts[r]:ds.starts[r + 1]]]
        assert lengths[samples].sum() <= 256
        assert len({int(ds.row_buckets[r])}) == 1
    ranges = [lengths[ds.index[ds.docs[ds.starts[r]:ds.starts[r + 1]]]] for r in range(len(ds))]
    assert np.mean([x.max() / x.min() for x in ranges]) < np.mean(
        [x.max() / x.min() for x in (lengths[plain.index[plain.docs[plain.starts[r]:plain.starts[r + 1]]]]
                                     for r in range(len(plain)))])


@pytest.mark.parametrize("num_rows,batch", [(103, 8), (96, 8), (5, 8), (40, 1)])
def test_bucketed_micro_batches_cover_every_row_once_per_epoch_and_resume_exactly(num_rows, batch):
    groups = np.random.default_rng(0).integers(0, 4, num_rows)
    stream = RowStream(num_rows, seed=7, groups=groups, batch_size=batch)
    epochs = 4
    rows = stream.take(0, epochs * num_rows)
    for e in range(epochs):
        assert sorted(rows[e * num_rows:(e + 1) * num_rows]) == list(range(num_rows))
    cuts = range(0, epochs * num_rows - batch + 1, batch)
    mixed = sum(len(set(groups[rows[c:c + batch]].tolist())) > 1 for c in cuts)
    assert mixed <= epochs * (4 + 2)  # only the pooled leftovers and the epochs' seams mix buckets
    more = stream.take(0, 6 * num_rows + 5 * batch)
    for cursor in (0, batch, 5 * batch, num_rows, 3 * num_rows + 1):  # a fresh stream resumed at cursor
        resumed = RowStream(num_rows, 7, groups, batch)
        assert resumed.take(cursor, 2 * batch) == more[cursor:cursor + 2 * batch]
    assert RowStream(num_rows, 8, groups, batch).take(0, num_rows) != rows[:num_rows] or num_rows < 8


def test_the_recipe_key_buckets_training_rows_only(tiny_corpus, debug_model):
    data = DataConfig(path=str(tiny_corpus), seq_len=64, length_buckets=4)
    data.validate()
    train, val = (dataset_for(data, s, debug_model.processor, seed=0, cache=False) for s in ("train", "val"))
    assert set(train.row_buckets.tolist()) == {0, 1, 2, 3} and val.row_buckets is None
    with pytest.raises(ValueError, match="data.length_buckets must be >= 0"):
        DataConfig(length_buckets=-1).validate()
    with pytest.raises(ValueError, match="contrastive task's pairs are not packed"):
        DataConfig(task="contrastive", length_buckets=2).validate()


def test_clips_are_bucketed_by_their_encoder_inputs_size_read_from_the_cache_without_the_bytes(
        tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_ROWS", 7)  # several shards: several Arrow chunks
    g = torch.Generator().manual_seed(0)
    samples = []
    for j in range(30):  # cross-attended clips: one token each, their log-mel as long as the clip
        frames = int(torch.randint(10, 300, (1,), generator=g)) if j % 3 else 0
        media = [MediaSlot(0, 0, "audio", torch.randn(8, frames, generator=g))] if frames else []
        samples.append(Rendered(torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long),
                                torch.zeros(3, 4, dtype=torch.long), media))
    cached = cache.build(tmp_path, range(30), lambda j: samples[j], lambda *a: {}, {})
    in_memory = RenderedSamples(samples)
    assert (cached.media_bytes == in_memory.media_bytes).all()
    assert in_memory.media_bytes.tolist() == [sum(m.data.numel() * 4 for m in r.media) for r in samples]
    ds = PackedDataset([cached], (np.zeros(30), np.arange(30)), 16, 0, False, buckets=3, seed=0)
    frames = cached.media_bytes[ds.index]
    edges = [frames[[d for r in range(len(ds)) if ds.row_buckets[r] == b
                     for d in ds.docs[ds.starts[r]:ds.starts[r + 1]]]] for b in range(3)]
    assert edges[0].max() <= edges[1].min() and edges[1].max() <= edges[2].min()  # by clip, not tokens
