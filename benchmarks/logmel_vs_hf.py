"""omni's LogMel vs transformers' WhisperFeatureExtractor: log-mel throughput on the same clips.

    python benchmarks/logmel_vs_hf.py                     # 16 clips of 5-15 s, 7 interleaved repeats
    python benchmarks/logmel_vs_hf.py --clips 4 --repeats 3   # a quick check

Two settings: Whisper's default (every clip padded to 30 s -> 3000 frames; transformers' default
call, ``LogMel(pad_to_s=30)``) and no padding beyond the batch's longest clip (transformers'
``padding="longest"``, ``LogMel().batch``). Also a single clip. Outputs are checked equal (max
abs difference). Goal: >= 5x transformers' clips/s in Whisper's setting. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from common import cpu_model, interleaved  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--min-s", type=float, default=5.0)
    p.add_argument("--max-s", type=float, default=15.0)
    p.add_argument("--n-mels", type=int, default=80)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other jobs skew CPU timings
    import transformers
    from transformers import WhisperFeatureExtractor

    import omni
    from omni.tokenizers.audio import LogMel

    rng = np.random.default_rng(args.seed)
    clips = [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32)
             for s in rng.uniform(args.min_s, args.max_s, args.clips)]
    audio_s = sum(len(c) for c in clips) / 16000
    fe = WhisperFeatureExtractor(feature_size=args.n_mels)
    whisper, plain = LogMel(args.n_mels, pad_to_s=30.0), LogMel(args.n_mels)
    settings = {
        "whisper (pad to 30 s)": (lambda: fe(clips, sampling_rate=16000, return_tensors="pt").input_features,
                                  lambda: whisper.batch([torch.from_numpy(c) for c in clips])[0]),
        "longest (no 30 s pad)": (lambda: fe(clips, sampling_rate=16000, padding="longest",
                                             return_tensors="pt").input_features,
                                  lambda: plain.batch([torch.from_numpy(c) for c in clips])[0]),
        "one clip, pad to 30 s": (lambda: fe(clips[0], sampling_rate=16000,
                                             return_tensors="pt").input_features,
                                  lambda: whisper(torch.from_numpy(clips[0]))[None]),
    }
    results, rows = {}, []
    for name, (hf_fn, omni_fn) in settings.items():
        diff = float((hf_fn() - omni_fn()).abs().max())
        t = interleaved({"hf": hf_fn, "omni": omni_fn}, args.repeats, args.warmup)
        n = 1 if name.startswith("one") else args.clips
        o, h = statistics.median(t["omni"]), statistics.median(t["hf"])
        results[name] = {"omni_s": o, "hf_s": h, "omni_s_min": min(t["omni"]), "hf_s_min": min(t["hf"]),
                         "omni_clips_per_s": n / o, "hf_clips_per_s": n / h, "speedup": h / o,
                         "speedup_best": min(t["hf"]) / min(t["omni"]), "max_abs_diff": diff}
        rows.append((name, n / o, n / h, h / o, diff))

    print(f"\nLogMel vs WhisperFeatureExtractor (transformers {transformers.__version__}) | {cpu_model()} | "
          f"{args.threads} threads | {args.clips} clips, {audio_s:.0f} s of audio | median of {args.repeats}")
    print(f"{'setting':<26}{'omni clips/s':>14}{'hf clips/s':>12}{'speedup':>9}{'max |diff|':>12}")
    for name, o, h, s, d in rows:
        print(f"{name:<26}{o:>14.1f}{h:>12.1f}{s:>8.1f}x{d:>12.1e}")
    record = {
        "benchmark": "logmel_vs_hf",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {"cpu": cpu_model(), "threads": args.threads, "logical_cpus": os.cpu_count(),
                     "device": "cpu", "loadavg_1m_at_start": load_before},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "omni": omni.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "config": {"clips": args.clips, "min_s": args.min_s, "max_s": args.max_s, "n_mels": args.n_mels,
                   "repeats": args.repeats, "warmup": args.warmup, "audio_s": audio_s},
        "goals": {"speedup_min_whisper_setting": 5.0},
        "results": results,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
