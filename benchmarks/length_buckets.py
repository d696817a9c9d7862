"""Padding with and without length-bucketed sampling (``data.length_buckets``) on a speech
manifest's real clip lengths: the packing plan and the micro-batch order that training uses
(``PackedDataset``, ``RowStream``), over one epoch.

    python benchmarks/length_buckets.py --manifest data/speech/train.jsonl

Sample lengths come from each row's ``duration`` and transcript, for two layouts:
``cross`` (whisper/asr_tiny: the clip is read by cross-attention, a row holds the transcripts:
words + 4 template tokens, seq_len 64, 12 rows a micro-batch) and ``tokens`` (whisper/asr_base:
the clip is 25 tokens a second in the row, then 1.3 tokens a word + 6, seq_len 256, 64 rows).
Buckets are made by the clips' size (their log-mel's bytes), as training makes them for samples
with media. Reported per layout and bucket count: the rows' padding (1 - tokens / (rows x seq_len)), the
audio encoder's padding when each micro-batch's clips go through in one call padded to the
longest (mel frames, 100 a second), the same with the encoder's own length groups
(``AudioEncoder``: calls of at most 25% padding) and how many encoder calls that takes.
With ``--train-steps N``, ``whisper/asr_tiny`` then trains for real (``Trainer.step``, its own
cache under a temporary folder) once per ``--train-buckets`` count, the runs' steps interleaved one
by one so that they share the machine's load: seconds per step (median after a warm-up step) and
the encoder padding of the clips each step read, as above. Ends with one JSON line.

    python benchmarks/length_buckets.py --train-steps 16     # the plan, then 16 steps off / 8 buckets
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from omni.data.tasks import PackedDataset
from omni.model.media_encoder import length_buckets as encoder_groups
from omni.train.loop import RowStream

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

LAYOUTS = {  # name: (seq_len, batch_size, tokens of a clip of d seconds with w words)
    "cross": (64, 12, lambda d, w: w + 4),
    "tokens": (256, 64, lambda d, w: math.ceil(25 * d) + math.ceil(1.3 * w) + 6),
}


class Lengths:
    """Samples known by their lengths and their clips' log-mel bytes (80 mels x frames, float32),
    what the plan and the buckets are made from."""

    def __init__(self, lengths, frames):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.media_bytes = 80 * 4 * np.asarray(frames, dtype=np.int64)
        self.has_media = np.ones(len(lengths), dtype=bool)
        self.num_streams = 0


def measure(durations, words, layout: str, buckets: int, seed: int = 0) -> dict:
    seq_len, batch, tokens = LAYOUTS[layout]
    lengths = [tokens(d, w) for d, w in zip(durations, words)]
    frames = np.array([round(100 * d) for d in durations])
    order = (np.zeros(len(lengths)), np.arange(len(lengths)))
    ds = PackedDataset([Lengths(lengths, frames)], order, seq_len, 0, False, buckets=buckets, seed=seed)
    stream = RowStream(len(ds), seed, ds.row_buckets, batch)
    real = padded_one = padded_groups = calls = 0
    for cursor in range(0, len(ds) - len(ds) % batch, batch):  # the epoch's whole micro-batches
        rows = stream.take(cursor, batch)
        clips = [int(frames[ds.index[d]]) for r in rows for d in ds.docs[ds.starts[r]:ds.starts[r + 1]]]
        real += sum(clips)
        padded_one += len(clips) * max(clips)
        groups = encoder_groups(clips)
        padded_groups += sum(len(g) * max(clips[i] for i in g) for g in groups)
        calls += len(groups)
    steps = len(ds) // batch
    return {"layout": layout, "buckets": buckets, "rows": len(ds), "micro_batches": steps,
            "row_padding": 1 - ds.num_tokens / (len(ds) * seq_len),
            "encoder_padding_one_call": 1 - real / padded_one,
            "encoder_padding_groups": 1 - real / padded_groups, "encoder_calls_per_batch": calls / steps}


def padding(clips: list[int]) -> tuple[int, int, int, int]:
    """A micro-batch's clips (mel frames): (real frames, frames in one padded call, frames in the
    encoder's own length groups, its calls)."""
    groups = encoder_groups(clips)
    return (sum(clips), len(clips) * max(clips), sum(len(g) * max(clips[i] for i in g) for g in groups),
            len(groups))


def train(recipe: str, data: str, bucket_counts: list[int], steps: int, threads: int) -> list[dict]:
    """``steps`` training steps of ``recipe`` per bucket count, interleaved step by step."""
    import torch
    from tqdm import tqdm

    from omni.config import load_recipe
    from omni.train.loop import Trainer, batches

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="omni_length_buckets."))
    runs = {}
    with contextlib.ExitStack() as stack:
        for b in bucket_counts:
            t = Trainer(load_recipe(recipe, [
                f"data.path={data}", f"data.length_buckets={b}", f"data.cache_dir={tmp / 'cache'}",
                f"train.out_dir={tmp / str(b)}", "train.progress=false"]))
            stack.enter_context(t.run_folder())
            t.setup()
            t.bar, seen = tqdm(disable=True), []

            def recorded(it, seen=seen):
                for batch in it:
                    seen.append(padding([slot.data.shape[-1] for _, slot in batch["media"]]))
                    yield batch
            t.batches = recorded(batches(t.train_set, t.stream, 0, t.tc.batch_size, mrope=t.cfg.model.mrope))
            runs[b] = (t, seen, [])
        for i in range(steps + 1):  # step 0 warms up
            for b in bucket_counts if i % 2 == 0 else bucket_counts[::-1]:
                t, _, times = runs[b]
                t0 = time.perf_counter()
                t.step()
                times.append(time.perf_counter() - t0)
    out = []
    for b, (t, seen, times) in runs.items():
        real, one, groups, calls = (sum(x) for x in zip(*seen[1:]))
        out.append({"recipe": recipe, "buckets": b, "steps": steps,
                    "s_per_step": statistics.median(times[1:]),
                    "encoder_padding_one_call": 1 - real / one, "encoder_padding_groups": 1 - real / groups,
                    "encoder_calls_per_batch": calls / steps, "last_loss": t.last_loss})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default="data/speech/train.jsonl")
    ap.add_argument("--buckets", type=int, nargs="*", default=[0, 4, 8, 16])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-steps", type=int, default=0, help="real training steps per bucket count")
    ap.add_argument("--train-buckets", type=int, nargs="*", default=[0, 8])
    ap.add_argument("--recipe", default="whisper/asr_tiny")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    rows = [json.loads(x) for x in Path(args.manifest).read_text().splitlines() if x.strip()]
    durations = [float(r["duration"]) for r in rows]
    words = [len(r["text"].split()) for r in rows]
    print(f"{args.manifest}: {len(rows)} clips, {min(durations):.2f}-{max(durations):.2f} s "
          f"(median {np.median(durations):.2f} s)")
    print("| layout | buckets | rows | micro-batches | row padding | encoder padding, one call | "
          "encoder padding, its groups | encoder calls / batch |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for layout in LAYOUTS:
        for b in args.buckets:
            m = measure(durations, words, layout, b, args.seed)
            results.append(m)
            print(f"| {layout} | {b or 'off'} | {m['rows']} | {m['micro_batches']} | "
                  f"{m['row_padding']:.1%} | {m['encoder_padding_one_call']:.1%} | "
                  f"{m['encoder_padding_groups']:.1%} | "
                  f"{m['encoder_calls_per_batch']:.2f} |")
    trained = []
    if args.train_steps:
        trained = train(args.recipe, str(Path(args.manifest).parent), args.train_buckets, args.train_steps,
                        args.threads)
        print(f"\n{args.recipe}, {args.train_steps} steps each, interleaved:")
        print("| `data.length_buckets` | s / step | encoder padding, one call | "
              "encoder padding, its groups | encoder calls / micro-batch |")
        print("|---|---|---|---|---|")
        for m in trained:
            print(f"| {m['buckets'] or 'off'} | {m['s_per_step']:.2f} | "
                  f"{m['encoder_padding_one_call']:.1%} | {m['encoder_padding_groups']:.1%} | "
                  f"{m['encoder_calls_per_batch']:.2f} |")
    config = {"manifest": args.manifest, "clips": len(rows), "seed": args.seed,
              "train_steps": args.train_steps}
    json_line("length_buckets", args.threads, config, {"runs": results, "trained": trained})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
