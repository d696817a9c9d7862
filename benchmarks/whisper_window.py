"""A shorter encoder window for short clips (whisper.cpp's ``--audio-ctx``): how much faster, and what
it does to the transcripts.

    python benchmarks/whisper_window.py --files 60 --margins 10,5,2,1

Whisper reads every clip in a 30-s window (1,500 encoder positions), and with one short clip per
window most of a transcription's time is the encoder on padding. Cutting the window to the clip
plus ``margin`` seconds (rounded up to a multiple of it) does proportionally less encoder work, but
the weights were trained on 30-s windows only. Imported Whisper base (``benchmarks/whisper_parity.py``'s
packages), the asterisk prompts (real speech), greedy, no timestamps; each window against the full
one: WER, transcripts that differ, seconds. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from whisper_parity import ASTERISK, PACKAGES, asterisk_prompts, package_dirs, wer  # noqa: E402

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(PACKAGES), default="base")
    p.add_argument("--files", type=int, default=60)
    p.add_argument("--margins", default="10,5,2,1", help="seconds after the clip, comma-separated")
    p.add_argument("--asterisk", default=ASTERISK)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import omni
    from omni.media.audio import Audio

    files = asterisk_prompts(Path(args.asterisk), args.files)
    if not files:
        raise SystemExit(f"no asterisk prompts under {args.asterisk} (see whisper_parity.py)")
    dirs = package_dirs(args.model)
    pipe = omni.import_hf(dirs if len(dirs) > 1 else dirs[0])
    audio = pipe.model.encoders["audio"]
    rate = 16000
    waves = [Audio(str(f)).resample(rate).waveform for f, _ in files]
    refs = [t for _, t in files]

    def run(margin: float | None) -> tuple[list[str], float]:
        texts, start = [], time.perf_counter()
        for w in waves:
            clip = len(w) / rate
            seconds = 30.0 if margin is None else min(30.0, math.ceil((clip + margin) / margin) * margin)
            audio.logmel.pad_to = int(seconds * rate)  # the window the log-mel pads the clip to
            texts.append(pipe.generate([Audio(w, sample_rate=rate)], max_new_tokens=128).strip())
        return texts, time.perf_counter() - start

    run(None)  # warm-up
    full, full_s = run(None)
    results = {"files": len(files), "audio_s": round(sum(len(w) for w in waves) / rate, 1),
               "wer_30s": round(wer(refs, full), 4), "seconds_30s": round(full_s, 1)}
    for margin in (float(m) for m in args.margins.split(",")):
        texts, s = run(margin)
        differ = [i for i, (a, b) in enumerate(zip(full, texts)) if a != b]
        for i in differ[:3]:
            print(f"margin {margin:g} s, {files[i][0].name}: {full[i]!r} -> {texts[i][:120]!r}")
        results.update({f"wer_{margin:g}s": round(wer(refs, texts), 4), f"seconds_{margin:g}s": round(s, 1),
                        f"speedup_{margin:g}s": round(full_s / s, 2), f"differ_{margin:g}s": len(differ)})
    return json_line("whisper_window", args.threads, {"model": args.model, "data": "asterisk-core-sounds-en"},
                     results)


if __name__ == "__main__":
    main()
