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
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default="data/speech/train.jsonl")
    ap.add_argument("--buckets", type=int, nargs="*", default=[0, 4, 8, 16])
    ap.add_argument("--seed", type=int, default=0)
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
    json_line("length_buckets", 1, {"manifest": args.manifest, "clips": len(rows), "seed": args.seed},
              {"runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
