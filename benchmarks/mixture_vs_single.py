"""The any-to-any mixture against the single-task tiny recipes, task by task, on the same test
splits: each task's headline metric (WER, CIDEr-D, next-code accuracy, perplexity), the relative
change, and whether the mixture stays within 25% of the single-task model. Reads the runs'
``eval_test.json`` files (``omni eval --ckpt RUN``); trains nothing. Ends with one JSON line.

    python benchmarks/mixture_vs_single.py --mixture runs/any2any_tiny

Perplexities are per token of each run's own tokenizer (the mixture's SentencePiece model is
trained on all its tasks' text, text/tiny's on Wikipedia alone), so that row compares loosely.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

# mixture task label -> (single-task run, metric key, higher is better, the value docs/benchmarks.md
# records for that recipe, used when the run is not on this machine)
SINGLE = {
    "asr": ("runs/whisper_asr_tiny", "wer", False, 0.026),
    "continue": ("runs/audiolm_continue_tiny", "code_accuracy", True, None),  # codec-dependent: retrain on the mixture's
    "speak": ("runs/audiolm_speak_tiny", "code_accuracy", True, None),  # 31.0% was on an older codec
    "image_caption": ("runs/llava_caption_tiny", "cider_d", True, 0.28),
    "sound_caption": ("runs/audiocaps_sounds_tiny", "cider_d", True, 0.03),
    "video_caption": ("runs/videollama_caption_tiny", "cider_d", True, 0.83),
    "text": ("runs/text_tiny", "ppl", False, None),
}
TOLERANCE = 0.25


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixture", default="runs/any2any_tiny")
    p.add_argument("--split", default="test")
    p.add_argument("--single", action="append", default=[], metavar="TASK=RUN",
                   help="another single-task run for a task, e.g. continue=runs/continue_democodec (one on the mixture's codec)")
    args = p.parse_args(argv)
    runs = {label: run for label, (run, *_) in SINGLE.items()}
    for item in args.single:
        label, _, run = item.partition("=")
        if label not in SINGLE or not run:
            raise SystemExit(f"--single {item!r}: expected TASK=RUN with TASK one of {', '.join(SINGLE)}")
        runs[label] = run
    mix = _read(Path(args.mixture) / f"eval_{args.split}.json")
    if mix is None:
        raise SystemExit(f"{args.mixture}: no eval_{args.split}.json; run `omni eval --ckpt {args.mixture}` first")
    rows = []
    for label, (_, key, higher, recorded) in SINGLE.items():
        run = runs[label]
        m = mix["tasks"].get(label, {}).get(key)
        single = _read(Path(run) / f"eval_{args.split}.json")
        s = single.get(key) if single else recorded if args.split == "test" else None
        source = run if single else "docs/benchmarks.md" if s is not None else None
        row = {"task": label, "metric": key, "mixture": m, "single": s, "single_from": source}
        if m is not None and s:
            row["relative"] = m / s - 1
            row["within_25pct"] = m >= (1 - TOLERANCE) * s if higher else m <= (1 + TOLERANCE) * s
        rows.append(row)
    print(f"{'task':<15}{'metric':<15}{'single':>10}{'mixture':>10}{'change':>9}  within 25%")
    for r in rows:
        f = (lambda v: f"{v:.3f}" if isinstance(v, float) else "-")
        change = f"{100 * r['relative']:+.0f}%" if "relative" in r else "-"
        print(f"{r['task']:<15}{r['metric']:<15}{f(r['single']):>10}{f(r['mixture']):>10}{change:>9}  "
              f"{ {True: 'yes', False: 'NO'}.get(r.get('within_25pct'), 'no single run') }")
    print(json.dumps({"benchmark": "mixture_vs_single", "date": datetime.datetime.now(datetime.timezone.utc)
                      .isoformat(timespec="seconds"), "mixture": args.mixture, "split": args.split,
                      "tolerance": TOLERANCE, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
