"""Word error rates of a speech LLM run (e.g. ``speechllm/smollm_whisper_tiny``) against the imported
Whisper whose encoder it reads, on the same files.

    omni data build speech --size full --max-rows 2000 --out data/speech_wiki_2k
    omni train speechllm/smollm_whisper_tiny
    python benchmarks/speechllm_wer.py --whisper weights/whisper-base \\
        --run runs/speechllm_smollm_whisper_tiny --data data/speech_wiki_2k --rows 100 --files 40

Two sets, both scored by ``omni eval`` (greedy, the run's own prompt and chat template; the imported
Whisper decodes its 30-s window; at most 48 new tokens for a corpus sentence, 96 for a real
prompt): (a) the corpus' held-out ``test_piper`` split (the neural piper voice, never trained on)
and any other ``--splits``; (b) real speech, Debian's ``asterisk-core-sounds-en`` prompts (one
speaker, 8 kHz; see benchmarks/whisper_parity.py for the download), written as a manifest
``asterisk.jsonl`` so both sides read them through the same
loader. Every WER is recomputed from the kept predictions (``<ckpt>/eval_<split>.jsonl``) with one
normalisation on both sides (``whisper_parity.normalize``: lower case, punctuation dropped), and
again with digits and "%" spelled out (``_spelled``: the corpus spells numbers, Whisper writes
digits). ``--rescore`` scores the kept predictions without running a model. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from whisper_finetune import kept_wer, scoring_args  # noqa: E402
from whisper_parity import asterisk_prompts  # noqa: E402

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--whisper", default="weights/whisper-base", help="the imported Whisper checkpoint")
    p.add_argument("--run", default="runs/speechllm_smollm_whisper_tiny", help="the speech LLM run folder")
    p.add_argument("--data", default="data/speech_wiki_2k")
    p.add_argument("--splits", default="test_piper")
    p.add_argument("--sides", default="whisper,run", help="which checkpoints to score")
    p.add_argument("--num-beams", type=int, default=1, help="the run's beam search (Whisper stays greedy)")
    p.add_argument("--ctc-weight", type=float, default=0.0,
                   help="the run's joint CTC/attention decoding (ctc_on: connector; 1.0: CTC alone)")
    scoring_args(p)
    return p.parse_args(argv)


def write_asterisk_manifest(files: list[tuple[Path, str]], folder: Path) -> Path:
    """``asterisk.jsonl`` under ``folder``: one row per prompt, the wav by its absolute path."""
    from omni.io import write_jsonl

    write_jsonl(folder / "asterisk.jsonl", [{"id": wav.stem, "audio": str(wav.resolve()), "text": text}
                                            for wav, text in files])
    return folder


def score(ckpt: str, data: str, split: str, rows: int | None, max_new_tokens: int, **decoding) -> float:
    """``omni eval`` of ``ckpt`` on ``<data>/<split>.jsonl`` (``decoding``: its ``num_beams`` and
    ``ctc_weight``); returns the seconds it took."""
    from omni.eval import evaluate

    task = None if (Path(ckpt) / "recipe.yaml").is_file() else "caption"  # an imported checkpoint
    start = time.perf_counter()
    evaluate(ckpt, split=split, max_rows=rows, data_path=data, task=task, max_new_tokens=max_new_tokens,
             progress=False, **decoding)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    from omni.eval import decoding_suffix

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    files = asterisk_prompts(Path(args.asterisk), args.files)
    if not files:
        raise SystemExit(f"no asterisk prompts under {args.asterisk} (see benchmarks/whisper_parity.py)")
    real = write_asterisk_manifest(files, Path(tempfile.mkdtemp(prefix="asterisk_")))
    splits = [s for s in args.splits.split(",") if s]
    results: dict = {}
    for side, ckpt in (("whisper", args.whisper), ("run", args.run)):
        if side not in args.sides.split(","):
            continue
        decoding = {"num_beams": args.num_beams, "ctc_weight": args.ctc_weight} if side == "run" else {}
        suffix = decoding_suffix(**decoding)  # of the file omni eval keeps the predictions in
        # the corpus' sentences have <= 20 words; the longest asterisk prompts ~60 (eval's 48 tokens cut them)
        for name, data, rows, tokens in [*((s, args.data, args.rows, 48) for s in splits),
                                         ("asterisk", str(real), None, 96)]:
            if not args.rescore:
                seconds = score(ckpt, data, name, rows, tokens, **decoding)
                results[f"seconds_{name}_{side}"] = round(seconds, 1)
            w, w_spelled = kept_wer(ckpt, name + suffix)
            results[f"wer_{name}_{side}"] = round(w, 4)
            results[f"wer_{name}_{side}_spelled"] = round(w_spelled, 4)
    return json_line("speechllm_wer", args.threads,
                     {"whisper": args.whisper, "run": args.run, "data": args.data, "rows": args.rows,
                      "files": len(files), "num_beams": args.num_beams, "ctc_weight": args.ctc_weight},
                     results)


if __name__ == "__main__":
    main()
