"""The training data stream (issue 26): rows read from prepared-sample caches by DataLoader
workers, each once per epoch over processes, and the same losses as rendering in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import omni.train.loop as loop
from omni.config import load_recipe
from omni.data.tasks import MixtureDataset, PackedDataset, RenderedSamples, TaskDataset, TaskSpec, collate
from omni.io import write_jsonl
from omni.processor import Processor
from omni.sequence import Rendered
from omni.train.loop import RowStream, batches, read_metrics, train


def overrides(data, tok, out, **extra) -> list[str]:
    base = {"model.size": "debug", "model.max_seq_len": 64, "data.seq_len": 64, "data.path": data,
            "tokenizer.path": tok, "train.out_dir": out, "train.batch_size": 4, "train.steps": 6,
            "train.warmup_steps": 2, "train.lr": 0.003, "train.eval_every": 3, "train.eval_batches": 2,
            "train.save_every": 3, "train.log_every": 1, "train.progress": "false"}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def test_micro_batches_are_the_same_from_workers_and_cover_each_row_once_per_epoch(
        tiny_corpus, debug_model, tmp_path):
    ds = TaskDataset(tiny_corpus / "train.jsonl", TaskSpec("text"), debug_model, seq_len=32,
                     cache_dir=tmp_path)
    stream = RowStream(len(ds), seed=3)
    here = batches(ds, stream, 4, 4, mrope=False)
    workers = batches(ds, stream, 4, 4, num_workers=2, mrope=False)
    for _ in range(5):
        a, b = next(here), next(workers)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ranks = [batches(ds, stream, 0, 4, rank=r, world=2) for r in range(2)]
    seen = []
    for _ in range(-(-len(ds) // 4)):
        for r in ranks:
            seen += [tuple(x.tolist()) for x in next(r)["input_ids"]]
    every = [tuple(x.tolist()) for x in collate(list(ds))["input_ids"]]
    assert sorted(seen[:len(ds)]) == sorted(every)  # one epoch: every row once, over both processes


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_cached_rows_train_to_the_losses_of_in_memory_rows_with_or_without_workers(
        tiny_corpus, text_tokenizer, tmp_path, monkeypatch):
    text_tokenizer.save(tmp_path / "tok")

    def run(name, **extra):
        train(load_recipe("text/tiny", overrides(tiny_corpus, tmp_path / "tok", tmp_path / name, **extra)))
        return _losses(tmp_path / name)

    cold = run("cold", **{"data.cache_dir": tmp_path / "cache"})
    with monkeypatch.context() as m:
        m.setattr(Processor, "render", lambda *a, **k: pytest.fail("a warm run rendered a sample"))
        warm = run("warm", **{"data.cache_dir": tmp_path / "cache", "train.num_workers": 2})
    with monkeypatch.context() as m:
        cached = loop.dataset_for
        m.setattr(loop, "dataset_for", lambda *a, **k: cached(*a, **k, cache=False))
        in_memory = run("memory")
    assert len(cold) == 6 and cold == warm == in_memory


def _numbered(n, seed=0):
    """``n`` samples, sample j all token j + 1 (0 pads), of random lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        T = int(torch.randint(2, 30, (1,), generator=g))
        ids = torch.full((T,), j + 1)
        out.append(Rendered(ids, ids.clone(), torch.arange(T).expand(3, T), []))
    return out


def _epoch_rows(ds, stream, batch_size, world=2, workers=2):
    """One epoch's packed rows as ``world`` processes, each reading with ``workers`` DataLoader
    workers, take them: every process's share of each global micro-batch, in order."""
    ranks = [batches(ds, stream, 0, batch_size, rank=r, world=world, num_workers=workers)
             for r in range(world)]
    rows = []
    for _ in range(-(-len(ds) // batch_size)):
        for r in ranks:
            rows += list(next(r)["input_ids"])
    return rows[:len(ds)]


@pytest.mark.parametrize("buckets", [0, 3])
def test_every_sample_is_read_once_per_epoch_over_two_processes_with_two_workers_each(buckets):
    samples = _numbered(90)
    ds = PackedDataset([RenderedSamples(samples)], (np.zeros(90), np.arange(90)), 32, 0, False,
                       buckets=buckets, seed=1)
    stream = RowStream(len(ds), seed=2, groups=ds.row_buckets, batch_size=4)
    tokens = torch.cat(_epoch_rows(ds, stream, 4))
    counts = torch.bincount(tokens, minlength=91)[1:]
    assert counts.tolist() == [len(s) for s in samples]  # each sample whole, once, over 2 x 2 readers


def test_a_mixture_draws_by_weight_and_a_subsampled_task_goes_on_through_its_own_stream(
        tiny_corpus, debug_model, tmp_path):
    rows = [json.loads(x) for x in (tiny_corpus / "train.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "a.jsonl", rows[:200])
    write_jsonl(tmp_path / "b.jsonl", rows[200:240])
    parts = [("a", tmp_path / "a.jsonl", TaskSpec("text"), 1.0, 1.0),
             ("b", tmp_path / "b.jsonl", TaskSpec("text"), 3.0, 1.0)]
    ds = MixtureDataset(parts, debug_model, 64, seed=0)
    assert ds.counts == {"a": 60, "b": 180} and ds.cycles == 4  # 60 of a's 200 a cycle: 4 cover them
    drawn = ds.source[ds.docs], ds.index[ds.docs]
    assert set(drawn[1][drawn[0] == 0].tolist()) == set(range(200))  # each of a's samples this epoch
    assert set(drawn[1][drawn[0] == 1].tolist()) == set(range(40))
    for c in range(4):  # the weights hold in every cycle of the draw, and so along the epoch's stream
        cycle = ds.source[240 * c:240 * (c + 1)]
        assert (cycle == 1).sum() == 180
    stream = RowStream(len(ds), seed=0)
    order = stream.take(0, len(ds))
    half = [int(ds.source[d]) for r in order[:len(ds) // 2] for d in ds.docs[ds.starts[r]:ds.starts[r + 1]]]
    assert abs(np.mean(half) - 0.75) < 0.06
    assert sorted(order) == list(range(len(ds)))


def test_a_batchs_media_crosses_to_the_training_process_in_one_shared_buffer():
    """A DataLoader worker's batch is pickled by torch's ForkingPickler: the media slots' tensors
    (any dtype and size, labels or none) arrive equal, as views of one shared-memory storage
    instead of one shared file (and one descriptor hand-over) per tensor."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from omni.sequence import MediaSlot, PackedRow

    def row(*slots):
        ids = torch.arange(6)
        return PackedRow(ids, ids, torch.zeros(3, 6, dtype=torch.long), torch.zeros(6, dtype=torch.long),
                         media=list(slots))

    slots = [MediaSlot(0, 2, "image", torch.randn(3, 5, 7)),
             MediaSlot(2, 3, "audio", torch.randn(80, 13), torch.tensor([4, 5, 6])),
             MediaSlot(1, 1, "video", torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8))]
    batch = collate([row(slots[0], slots[1]), row(slots[2])])
    back = pickle.loads(ForkingPickler.dumps(batch))
    assert [(i, s.start, s.length, s.modality) for i, s in back["media"]] == \
        [(0, 0, 2, "image"), (0, 2, 3, "audio"), (1, 1, 1, "video")]
    for (_, got), want in zip(back["media"], slots):
        assert got.data.dtype == want.data.dtype and torch.equal(got.data, want.data)
        assert (got.labels is None) == (want.labels is None)
        assert want.labels is None or torch.equal(got.labels, want.labels)
    tensors = [t for _, s in back["media"] for t in (s.data, s.labels) if t is not None]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert tensors[0].is_shared()
