"""Is the data pipeline the bottleneck? Samples/s of omni's data path against samples/s the
training step consumes, for a recipe on its corpus.

    python benchmarks/data_loader.py --recipe llava/caption_tiny --data data/images
    python benchmarks/data_loader.py --recipe videollama/caption_tiny --data data/video --max-rows 64
    python benchmarks/data_loader.py --recipe whisper/asr_tiny --data data/speech --max-rows 256

The data path has two stages (``omni/data/tasks.py``): (1) once per sample, decode the media
file and preprocess it for the recipe's encoder (resize + normalise, frame sampling, log-mel),
render and pack; (2) per step, collate packed rows into a batch. The training step is the
recipe's forward + backward + AdamW step at its batch size. Reports samples/s for each and the
ratio loader/consumption (> 1: the loader keeps up), and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_model, json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="llava/caption_tiny")
    p.add_argument("--data", required=True, help="the recipe's corpus folder (reads train.jsonl)")
    p.add_argument("--max-rows", type=int, default=128, help="manifest rows to load (stage 1)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from omni.config import load_recipe
    from omni.data.tasks import TaskDataset, TaskSpec, collate
    from omni.io import read_jsonl, write_jsonl
    from omni.pipeline import pipeline_from_recipe
    from omni.tokenizers.text import TextTokenizer, corpus_texts
    from omni.train.loop import _forward, _param_groups

    cfg = load_recipe(args.recipe, [f"data.path={args.data}"])
    data = Path(args.data).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="omni_loader_bench."))
    rows = list(read_jsonl(data / "train.jsonl"))[:args.max_rows]
    key = cfg.data.media if cfg.data.task == "caption" else "audio"
    for row in rows:  # the subset's manifest lives elsewhere: make media paths absolute
        row[key] = str(data / row[key])
    write_jsonl(tmp / "train.jsonl", rows)
    tok_path = Path(cfg.tokenizer.path)
    texts = corpus_texts(data / "train.jsonl", TaskSpec.of(cfg.data).text_field)
    tok = (TextTokenizer.load(tok_path) if (tok_path / "text.model").is_file() else
           TextTokenizer.train(texts, vocab_size=1024, model_type="word"))
    model = pipeline_from_recipe(cfg, tok)

    t0 = time.perf_counter()
    ds = TaskDataset(tmp / "train.jsonl", TaskSpec.of(cfg.data), model, cfg.data.seq_len)
    prepare_s = time.perf_counter() - t0
    docs_per_row = ds.num_docs / len(ds)
    bs = cfg.train.batch_size
    batches = [[ds[(i * bs + j) % len(ds)] for j in range(bs)] for i in range(args.steps)]

    t0 = time.perf_counter()
    for b in batches:
        collate(b, model.uses_mrope)
    collate_s = (time.perf_counter() - t0) / len(batches)

    opt = torch.optim.AdamW(_param_groups(model, 0.0), lr=1e-4)
    model.train()
    times = []
    for i, b in enumerate([batches[0]] + batches):  # the first step warms up
        t0 = time.perf_counter()
        out = _forward(model, collate(b, model.uses_mrope))
        out.objective.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    samples_per_step = bs * docs_per_row
    result = {
        "prepare_samples_per_s": round(ds.num_docs / prepare_s, 1),
        "collate_samples_per_s": round(samples_per_step / collate_s, 1),
        "train_samples_per_s": round(samples_per_step / step_s, 1),
        "train_step_s": round(step_s, 4),
        "samples_per_step": round(samples_per_step, 1),
    }
    result["loader_vs_train_first_epoch"] = round(
        result["prepare_samples_per_s"] / result["train_samples_per_s"], 2)
    result["loader_vs_train_later_epochs"] = round(
        result["collate_samples_per_s"] / result["train_samples_per_s"], 1)

    print(f"{args.recipe} on {data} ({ds.num_docs} samples, {docs_per_row:.2f} per row, batch {bs} rows), "
          f"{args.threads} threads, {cpu_model()}")
    print("| stage | samples/s |\n|---|---|")
    print(f"| decode + preprocess + render (once per sample) | {result['prepare_samples_per_s']} |")
    print(f"| collate (every step) | {result['collate_samples_per_s']} |")
    print(f"| training step consumes | {result['train_samples_per_s']} |")
    print(f"loader / consumption: first epoch {result['loader_vs_train_first_epoch']}x, "
          f"later epochs {result['loader_vs_train_later_epochs']}x")
    config = {"recipe": args.recipe, "data": str(data), "rows": ds.num_docs, "batch_rows": bs,
              "steps": args.steps}
    return json_line("data_loader", args.threads, config, result)


if __name__ == "__main__":
    main()
