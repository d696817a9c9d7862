"""The training data stream (issue 26): rows read from prepared-sample caches by DataLoader
workers, each once per epoch over processes, and the same losses as rendering in memory."""

from __future__ import annotations

import pytest
import torch

import omni.train.loop as loop
from omni.config import load_recipe
from omni.data.tasks import TaskDataset, TaskSpec, collate
from omni.processor import Processor
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
