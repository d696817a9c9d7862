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
way ``omni transcribe`` decodes one 30-s window. A fine-tuned run must not lose (b). The corpus
spells numbers ("fifty four percent") where Whisper and the asterisk transcripts write digits
("54%", "press 1"), so a run that learned the corpus' style loses words on (b) that it heard right:
every WER is also given with digits and "%" spelled out on both sides (``wer_*_spelled``), which
separates recognition from that style. Predictions are kept (``<ckpt>/eval_<split>.jsonl``,
``<ckpt>/eval_asterisk.jsonl``); ``--rescore`` scores the kept ones without running a model. Ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from whisper_parity import ASTERISK, asterisk_prompts, wer  # noqa: E402

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def scoring_args(p: argparse.ArgumentParser) -> None:
    """The options of a speech checkpoint's scoring (this script's and speechllm_wer.py's): rows of
    each corpus split, real asterisk prompts, rescoring kept predictions, threads."""
    p.add_argument("--rows", type=int, default=100, help="rows of each split scored (their first N)")
    p.add_argument("--files", type=int, default=40, help="asterisk prompts transcribed")
    p.add_argument("--asterisk", default=ASTERISK)
    p.add_argument("--rescore", action="store_true", help="score the predictions earlier runs kept")
    p.add_argument("--threads", type=int, default=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="weights/whisper-tiny-en", help="the imported checkpoint")
    p.add_argument("--after", default="runs/whisper_finetune_tiny_en", help="the fine-tuned run folder")
    p.add_argument("--data", default="data/speech")
    p.add_argument("--splits", default="test,test_piper")
    p.add_argument("--sides", default="before,after", help="which checkpoints to score (one side: the other "
                   "side's numbers come from an earlier run's JSON line)")
    scoring_args(p)
    return p.parse_args(argv)


def corpus_wer(ckpt: str, data: str, split: str, rows: int) -> float:
    from omni.eval import evaluate

    task = None if (Path(ckpt) / "recipe.yaml").is_file() else "caption"  # an imported checkpoint
    return evaluate(ckpt, split=split, max_rows=rows, data_path=data, task=task, progress=False)["wer"]


def real_wer(ckpt: str, files: list) -> tuple[float, list[str]]:
    import omni
    from omni.io import write_jsonl
    from omni.media.audio import Audio

    pipe = omni.load(ckpt)
    hyps = [pipe.generate([Audio(str(f)).resample(16000)], max_new_tokens=96).strip() for f, _ in files]
    write_jsonl(Path(ckpt) / "eval_asterisk.jsonl", [{"id": f.name, "reference": t, "prediction": h}
                                                     for (f, t), h in zip(files, hyps)])
    return wer([t for _, t in files], hyps), hyps


ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    return " ".join(ONES[int(d)] for d in str(n))  # digit by digit (extensions, codes)


def spelled(text: str) -> str:
    """Digits and % as the speech corpus writes them: "54%" -> "fifty four percent"."""
    return re.sub(r"\d+", lambda m: f" {_number(int(m.group()))} ", text.replace("%", " percent"))


def kept_wer(ckpt: str, name: str) -> tuple[float, float]:
    """(WER, WER with numbers spelled) of the predictions kept in ``<ckpt>/eval_<name>.jsonl``."""
    from omni.io import read_jsonl

    rows = list(read_jsonl(Path(ckpt) / f"eval_{name}.jsonl"))
    refs, hyps = [r["reference"] for r in rows], [r["prediction"] for r in rows]
    return wer(refs, hyps), wer([spelled(r) for r in refs], [spelled(h) for h in hyps])


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    files = asterisk_prompts(Path(args.asterisk), args.files)
    if not files:
        raise SystemExit(f"no asterisk prompts under {args.asterisk} (see benchmarks/whisper_parity.py)")
    results: dict = {}
    start = time.perf_counter()
    sides = args.sides.split(",")
    splits = [s for s in args.splits.split(",") if s]
    for side, ckpt in [(s, c) for s, c in (("before", args.before), ("after", args.after)) if s in sides]:
        if not args.rescore:
            real_wer(ckpt, files)
            for split in splits:
                corpus_wer(ckpt, args.data, split, args.rows)
        for name in [*splits, "asterisk"]:
            w, w_spelled = kept_wer(ckpt, name)
            results[f"wer_{name}_{side}"] = round(w, 4)
            results[f"wer_{name}_{side}_spelled"] = round(w_spelled, 4)
    results["seconds"] = round(time.perf_counter() - start, 1)
    return json_line("whisper_finetune", args.threads,
                     {"before": args.before, "after": args.after, "rows": args.rows, "files": len(files)},
                     results)


if __name__ == "__main__":
    main()
