"""Is the data loader the bottleneck? Samples/s that the training DataLoader delivers from a warm
prepared-sample cache with 0, 2 and 4 workers, against samples/s the training step consumes, for
an audio, an image and a video recipe; and the cold path (the cache build: decode + preprocess +
render + write).

    python benchmarks/data_loader.py                          # the three *_tiny recipes and their *_base
    python benchmarks/data_loader.py --recipes llava/caption_tiny --base   # one, without the *_base row
    python benchmarks/data_loader.py --recipes llava/caption_tiny --float-pixels  # + pixels cached as before

For each ``*_tiny`` recipe, on its built corpus (``data/speech``, ``data/images``, ``data/video``):

- cold: the recipe's train split rendered into a fresh cache (``dataset_for``, what ``omni train``
  and ``omni data prepare`` do), manifest rows per second;
- loader: the warm cache read through ``omni.train.loop.batches`` (the DataLoader ``omni train``
  uses, ``train.num_workers`` 0/2/4) at the recipe's batch size, samples (media clips) per second
  after the first micro-batch (worker start-up not counted);
- step: ``Trainer.step`` (forward, backward, clipping, AdamW; the recipe's ``Trainer`` built as
  ``omni train`` builds it) on micro-batches read beforehand, samples per second.

The loader and step measurements alternate, ``--rounds`` times each, so they share the machine's
load; medians are reported. With ``--base``, each ``*_base`` recipe's data path is measured the
same way on the same corpus (``data.path`` overridden: its preprocessing, packing and batch size;
``asr_base`` is meant for ``data/speech_full``), against its consumption at its GPU step rate:
``batch_size`` rows x the samples per row of its own packing here / the seconds per step measured on
one H200 (``H200_S_PER_STEP``, from docs/benchmarks.md and the recipes' headers). With
``--float-pixels``, a second cache of the same rows holds images and frames as float32 normalised
pixels (as before they were cached as uint8, :func:`float_pixels`) and its loaders (``*_float``)
run interleaved with the others. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_model, cut_corpus, json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

CORPUS = {"whisper/asr_tiny": "data/speech", "llava/caption_tiny": "data/images",
          "videollama/caption_tiny": "data/video"}
# seconds per optimizer step on one H200, bf16 (benchmarks/gpu_check.sh recipes, 2026-11-26: the
# recipes' headers and docs/benchmarks.md "On a GPU")
H200_S_PER_STEP = {"whisper/asr_base": 0.206, "llava/caption_base": 0.160, "videollama/caption_base": 3.8}
# asr_base's own 4k SentencePiece needs more transcripts than the tiny corpus has: the text one
# (transcripts are a few tokens next to a clip's 25 a second, so the packing hardly changes)
BASE_TOKENIZER = {"whisper/asr_base": ["tokenizer.path=runs/tokenizers/text_spm"]}
# name: (DataLoader workers, each media tensor shared on its own)
LOADERS = {"0": (0, False), "2": (2, False), "4": (4, False), "2_per_tensor": (2, True),
           "4_per_tensor": (4, True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="*", default=list(CORPUS))
    p.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                   help="also each recipe's *_base data path against its H200 step rate")
    p.add_argument("--per-tensor", action="store_true",
                   help="also 2 and 4 workers sharing each media tensor on its own (before MediaList)")
    p.add_argument("--float-pixels", action="store_true",
                   help="also 0/2/4 workers reading a cache of float32 pixels (before uint8 ones)")
    p.add_argument("--rows", type=int, help="read each corpus's first N training rows (common.cut_corpus)")
    p.add_argument("--batches", type=int, default=12, help="micro-batches timed per loader measurement")
    p.add_argument("--steps", type=int, default=3, help="training steps timed per step measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


@contextlib.contextmanager
def per_tensor_sharing(on: bool):
    """While on, DataLoader workers made here share each media tensor on its own (torch's way, as
    before ``omni.data.tasks.MediaList`` put a batch's media in one buffer)."""
    from omni.data.tasks import MediaList

    one_buffer = MediaList.__reduce__
    if on:
        MediaList.__reduce__ = object.__reduce__
    try:
        yield
    finally:
        MediaList.__reduce__ = one_buffer


@contextlib.contextmanager
def float_pixels():
    """While in, images and video frames are prepared as float32 normalised pixels, under their
    old ``data_format`` (so in a cache of their own), as before they were cached as uint8."""
    from omni.model.media_encoder import ImageEncoder, VideoEncoder

    saved = {cls: (cls.prepare, cls.data_format) for cls in (ImageEncoder, VideoEncoder)}

    def as_float(prepare):
        def wrapped(self, obj):
            data, grid = prepare(self, obj)
            tok = self.tokenizer if isinstance(self, ImageEncoder) else self.video.image_tokenizer
            return tok.normalize(data), grid
        return wrapped

    for cls, (prepare, _) in saved.items():
        cls.prepare, cls.data_format = as_float(prepare), 1
    try:
        yield
    finally:
        for cls, (prepare, fmt) in saved.items():
            cls.prepare, cls.data_format = prepare, fmt


def float_twin(cfg, processor, args):
    """The train split again, cached with :func:`float_pixels` (None without ``--float-pixels``)."""
    from omni.data.tasks import dataset_for

    if not args.float_pixels:
        return None
    with float_pixels():
        return dataset_for(cfg.data, "train", processor, cfg.train.seed)


def loader_rate(dataset, batch_size: int, loader: str, count: int, mrope: bool, seed: int = 0) -> float:
    """Media samples per second out of the training DataLoader (after its first micro-batch);
    ``loader``: a key of :data:`LOADERS`."""
    from omni.train.loop import RowStream, batches

    workers, per_tensor = LOADERS[loader]
    stream = RowStream(len(dataset), seed, getattr(dataset, "row_buckets", None), batch_size)
    with per_tensor_sharing(per_tensor):
        it = batches(dataset, stream, 0, batch_size, num_workers=workers, mrope=mrope)
        next(it)  # workers started (forked: they keep the sharing they were made with)
    t0, n = time.perf_counter(), 0
    for _ in range(count):
        n += len(next(it).get("media", []))
    rate = n / (time.perf_counter() - t0)
    del it  # stops the workers
    return rate


def cold(cfg, processor):
    """The train split's cache built from nothing under ``data.cache_dir``: manifest rows per second."""
    from omni.data.tasks import dataset_for

    t0 = time.perf_counter()
    ds = dataset_for(cfg.data, "train", processor, cfg.train.seed)
    return (ds.num_docs + ds.num_bad) / (time.perf_counter() - t0)


def corpus(recipe: str, args, tmp: Path) -> str:
    """The recipe's corpus, or with ``--rows`` its first rows (``common.cut_corpus``)."""
    out = tmp / "corpora" / recipe.replace("/", "_")
    if args.rows and not out.exists():
        cut_corpus(recipe, out, args.rows, CORPUS[recipe])
    return str(out) if args.rows else CORPUS[recipe]


def samples_per_row(ds) -> float:
    return ds.num_docs / len(ds)


def interleaved(measures: dict, rounds: int) -> dict:
    """Each of ``measures`` (name: a function returning samples/s) ``rounds`` times, the order
    reversed every other round so that all share the machine's load; the medians."""
    rates = {name: [] for name in measures}
    for r in range(rounds):
        for name in list(measures) if r % 2 == 0 else list(measures)[::-1]:
            rates[name].append(measures[name]())
    return {name: round(statistics.median(v), 1) for name, v in rates.items()}


def loaders(ds, batch_size: int, mrope: bool, args, ds_float=None) -> dict:
    names = [*LOADERS] if args.per_tensor else ["0", "2", "4"]
    out = {f"loader_{n}": functools.partial(loader_rate, ds, batch_size, n, args.batches, mrope)
           for n in names}
    if ds_float is not None:
        out |= {f"loader_{n}_float": functools.partial(loader_rate, ds_float, batch_size, n, args.batches,
                                                       mrope) for n in ("0", "2", "4")}
    return out


def loader_names(args) -> list[str]:
    return ([*LOADERS] if args.per_tensor else ["0", "2", "4"]) + (
        ["0_float", "2_float", "4_float"] if args.float_pixels else [])


def measure_tiny(recipe: str, args, tmp: Path) -> dict:
    """A *_tiny recipe: its cache built cold, its loaders and its training step on 2 cores."""
    from accelerate import Accelerator
    from tqdm import tqdm

    from omni.config import load_recipe
    from omni.train.loop import RowStream, Trainer, batches, build_pipeline

    name = recipe.replace("/", "_")
    overrides = [f"data.path={corpus(recipe, args, tmp)}", f"data.cache_dir={tmp / 'cache' / name}",
                 f"train.out_dir={tmp / 'runs' / name}", "train.progress=false"]
    cfg = load_recipe(recipe, overrides)
    processor = build_pipeline(cfg, Accelerator(cpu=True)).processor
    cold_rate = cold(cfg, processor)
    ds_float = float_twin(cfg, processor, args)
    trainer = Trainer(load_recipe(recipe, overrides))
    with trainer.run_folder():
        trainer.setup()  # reads the cache cold() built
        ds, tc, mrope = trainer.train_set, trainer.tc, trainer.cfg.model.mrope
        trainer.bar = tqdm(disable=True)
        stream = RowStream(len(ds), tc.seed, getattr(ds, "row_buckets", None), tc.batch_size)
        ready = list(itertools.islice(batches(ds, stream, 0, tc.batch_size, mrope=mrope), args.steps + 1))
        per_step = statistics.mean(len(b.get("media", [])) for b in ready)

        def step_rate() -> float:
            trainer.batches = iter(ready)
            trainer.step()  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.step()
            return args.steps * per_step / (time.perf_counter() - t0)

        rates = interleaved({"step": step_rate, **loaders(ds, tc.batch_size, mrope, args, ds_float)},
                            args.rounds)
    step = rates.pop("step")
    return {"recipe": recipe, "samples": ds.num_docs, "rows": len(ds), "batch_rows": tc.batch_size,
            "samples_per_step": round(per_step, 1), "cold_rows_per_s": round(cold_rate, 1),
            "consumes_samples_per_s": step, "consumes": "2 cores", **rates,
            "best_loader_over_step": round(max(rates[f"loader_{n}"] for n in ("0", "2", "4")) / step, 1)}


def measure_base(recipe: str, args, tmp: Path) -> dict:
    """A *_tiny recipe's *_base: its cache built cold and its loaders here, against the samples/s of
    its step on one H200."""
    from accelerate import Accelerator

    from omni.config import load_recipe
    from omni.data.tasks import dataset_for
    from omni.train.loop import build_pipeline

    base = recipe.replace("_tiny", "_base")
    cfg = load_recipe(base, [f"data.path={corpus(recipe, args, tmp)}", *BASE_TOKENIZER.get(base, []),
                             f"data.cache_dir={tmp / 'cache' / base.replace('/', '_')}"])
    processor = build_pipeline(cfg, Accelerator(cpu=True)).processor
    cold_rate = cold(cfg, processor)
    ds = dataset_for(cfg.data, "train", processor, cfg.train.seed)  # warm: the cache just built
    bs = cfg.train.batch_size
    rates = interleaved(loaders(ds, bs, cfg.model.mrope, args, float_twin(cfg, processor, args)), args.rounds)
    gpu = round(bs * samples_per_row(ds) / H200_S_PER_STEP[base], 1)
    return {"recipe": base, "samples": ds.num_docs, "rows": len(ds), "batch_rows": bs,
            "samples_per_step": round(bs * samples_per_row(ds), 1), "cold_rows_per_s": round(cold_rate, 1),
            "consumes_samples_per_s": gpu, "consumes": f"H200 at {H200_S_PER_STEP[base]} s/step", **rates,
            "best_loader_over_step": round(max(rates[f"loader_{n}"] for n in ("0", "2", "4")) / gpu, 2)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="omni_loader_bench."))
    load = [os.getloadavg()[0]]
    results = []
    print(f"{cpu_model()}, {args.threads} threads, load average {load[0]:.1f}")
    names = loader_names(args)
    print("| recipe | samples / step | cache build (cold), rows/s | loader, samples/s: "
          + " / ".join(f"{n} workers" for n in names)
          + " | the step consumes, samples/s | best loader / step |")
    print("|---|---|---|---|---|---|")
    for recipe in args.recipes:
        for fn in (measure_tiny, measure_base) if args.base else (measure_tiny,):
            m = fn(recipe, args, tmp)
            results.append(m)
            print(f"| `{m['recipe']}` | {m['samples_per_step']} | {m['cold_rows_per_s']} | "
                  f"{' / '.join(str(m[f'loader_{n}']) for n in names)} | "
                  f"{m['consumes_samples_per_s']} ({m['consumes']}) | {m['best_loader_over_step']}x |",
                  flush=True)
            load.append(os.getloadavg()[0])
    print(f"load average (1 min) during the run: {min(load):.1f}-{max(load):.1f}")
    config = {"recipes": args.recipes, "corpora": CORPUS, "rows": args.rows, "batches": args.batches,
              "steps": args.steps, "rounds": args.rounds,
              "float_pixels": args.float_pixels, "load_average": [round(x, 1) for x in load]}
    return json_line("data_loader", args.threads, config, {"runs": results})


if __name__ == "__main__":
    main()
