"""Word error rates of an imported Whisper before and after fine-tuning it with `omni train`.

    omni import whisper --out weights/whisper-tiny-en
    omni data build speech --out data/speech
    omni train whisper/finetune_tiny_en
    python benchmarks/whisper_finetune.py --before weights/whisper-tiny-en \\
        --after runs/whisper_finetune_tiny_en --rows 100 --files 40

Two sets: (a) the speech corpus' held-out splits (``test``: held-out espeak/flite voices,
``test_piper``: the neural piper voice no run trains on), scored by ``omni eval`` (greedy, corpus
WER over lowercased words without punctuation; the transcripts spell numbers, so Whisper's "3%"
counts as an error until fine-tuning teaches it "three percent"); (b) real speech, Debian's
``asterisk-core-sounds-en`` prompts (recordings of one speaker with their transcript file; see
benchmarks/whisper_parity.py for the download), transcribed with ``omni.load(...).generate`` the
way ``omni transcribe`` decodes one 30-s window. A fine-tuned run must not lose (b). Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from whisper_parity import ASTERISK, asterisk_prompts, wer  # noqa: E402

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="weights/whisper-tiny-en", help="the imported checkpoint")
    p.add_argument("--after", required=True, help="the fine-tuned run folder")
    p.add_argument("--data", default="data/speech")
    p.add_argument("--splits", default="test,test_piper")
    p.add_argument("--rows", type=int, default=100, help="rows of each split scored (their first N)")
    p.add_argument("--files", type=int, default=40, help="asterisk prompts transcribed")
    p.add_argument("--asterisk", default=ASTERISK)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def corpus_wer(ckpt: str, data: str, split: str, rows: int) -> float:
    from omni.eval import evaluate

    task = None if (Path(ckpt) / "recipe.yaml").is_file() else "caption"  # an imported checkpoint
    return evaluate(ckpt, split=split, max_rows=rows, data_path=data, task=task, progress=False)["wer"]


def real_wer(ckpt: str, files: list) -> tuple[float, list[str]]:
    import omni
    from omni.media.audio import Audio

    pipe = omni.load(ckpt)
    hyps = [pipe.generate([Audio(str(f)).resample(16000)], max_new_tokens=96).strip() for f, _ in files]
    return wer([t for _, t in files], hyps), hyps


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    files = asterisk_prompts(Path(args.asterisk), args.files)
    if not files:
        raise SystemExit(f"no asterisk prompts under {args.asterisk} (see benchmarks/whisper_parity.py)")
    results: dict = {}
    start = time.perf_counter()
    for side, ckpt in (("before", args.before), ("after", args.after)):
        for split in args.splits.split(","):
            results[f"wer_{split}_{side}"] = round(corpus_wer(ckpt, args.data, split, args.rows), 4)
        w, hyps = real_wer(ckpt, files)
        results[f"wer_asterisk_{side}"] = round(w, 4)
        for (f, ref), hyp in list(zip(files, hyps))[:3]:
            print(f"{side} {f.name}: {ref!r} -> {hyp!r}")
    results["seconds"] = round(time.perf_counter() - start, 1)
    return json_line("whisper_finetune", args.threads,
                     {"before": args.before, "after": args.after, "rows": args.rows, "files": len(files)},
                     results)


if __name__ == "__main__":
    main()
