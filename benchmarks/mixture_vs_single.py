"""The any-to-any mixture against the single-task tiny recipes, task by task, on the same test
splits: each task's headline metric (WER, CIDEr-D, next-code accuracy, perplexity), the relative
change, and whether the mixture stays within 25% of the single-task model. Reads the runs'
``eval_test.json`` files (``omni eval --ckpt RUN``); trains nothing. Ends with one JSON line.

    python benchmarks/mixture_vs_single.py --mixture runs/any2any_tiny

Several runs of one recipe (seeds) put error bars on a row: repeat ``--single TASK=RUN`` for a task,
or ``--mixture RUN`` for the mixture; a row then compares the means and prints each side's range.

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
    "asr": ("runs/whisper_asr_tiny", "wer", False, 0.0331),  # mean of seeds 0 and 1 (2.56%, 4.05%)
    # codec-dependent: retrain on the mixture's
    "continue": ("runs/audiolm_continue_tiny", "code_accuracy", True, None),
    "speak": ("runs/audiolm_speak_tiny", "code_accuracy", True, None),  # 31.0% was on an older codec
    "image_caption": ("runs/llava_caption_tiny", "cider_d", True, 0.28),
    "sound_caption": ("runs/audiocaps_sounds_tiny", "cider_d", True, 0.03),
    "video_caption": ("runs/videollama_caption_tiny", "cider_d", True, 0.720),  # mean of seeds 0, 1, 2
    "text": ("runs/text_tiny", "ppl", False, None),
}
TOLERANCE = 0.25


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _metric(result: dict, label: str, key: str) -> float | None:
    """``key`` of an ``eval_*.json``: a single-task recipe's at the top, a mixture's (one task of
    it alone, as ``benchmarks/equal_compute.py`` writes) under ``tasks[label]``."""
    return result.get("tasks", {}).get(label, result).get(key)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(values: list[float]) -> str:
    """One run's value, or several runs' mean and range."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{_mean(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixture", action="append", metavar="RUN", help="a mixture run (repeat for seeds)")
    p.add_argument("--split", default="test")
    p.add_argument("--single", action="append", default=[], metavar="TASK=RUN",
                   help="a single-task run for a task, e.g. continue=runs/continue_democodec "
                        "(one on the mixture's codec); repeat a task for seeds")
    args = p.parse_args(argv)
    mixtures = args.mixture or ["runs/any2any_tiny"]
    runs = {label: [] for label in SINGLE}
    for item in args.single:
        label, _, run = item.partition("=")
        if label not in SINGLE or not run:
            raise SystemExit(f"--single {item!r}: expected TASK=RUN with TASK one of {', '.join(SINGLE)}")
        runs[label].append(run)
    mix = []
    for run in mixtures:
        found = _read(Path(run) / f"eval_{args.split}.json")
        if found is None:
            raise SystemExit(f"{run}: no eval_{args.split}.json; run `omni eval --ckpt {run}` first")
        mix.append(found)
    rows = []
    for label, (default_run, key, higher, recorded) in SINGLE.items():
        m = [v for v in (_metric(r, label, key) for r in mix) if v is not None]
        found = {run: _read(Path(run) / f"eval_{args.split}.json") for run in runs[label] or [default_run]}
        s = [v for v in (_metric(r, label, key) for r in found.values() if r) if v is not None]
        source = [run for run, r in found.items() if r]
        if not s and recorded is not None and args.split == "test":
            s, source = [recorded], ["docs/benchmarks.md"]
        row = {"task": label, "metric": key, "mixture": _mean(m), "single": _mean(s),
               "single_from": source or None, "mixture_runs": m, "single_runs": s}
        if m and s:
            row["relative"] = row["mixture"] / row["single"] - 1
            row["within_25pct"] = (row["mixture"] >= (1 - TOLERANCE) * row["single"] if higher
                                   else row["mixture"] <= (1 + TOLERANCE) * row["single"])
        rows.append(row)
    print(f"{'task':<15}{'metric':<15}{'single':>24}{'mixture':>24}{'change':>9}  within 25%")
    for r in rows:
        change = f"{100 * r['relative']:+.0f}%" if "relative" in r else "-"
        print(f"{r['task']:<15}{r['metric']:<15}{_cell(r['single_runs']):>24}"
              f"{_cell(r['mixture_runs']):>24}{change:>9}  "
              f"{ {True: 'yes', False: 'NO'}.get(r.get('within_25pct'), 'no single run') }")
    print(json.dumps({"benchmark": "mixture_vs_single", "date": datetime.datetime.now(datetime.timezone.utc)
                      .isoformat(timespec="seconds"), "mixture": mixtures, "split": args.split,
                      "tolerance": TOLERANCE, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
