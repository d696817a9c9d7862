"""Long-form transcription (omni/transcribe.py) on a long file built from real utterances.

    omni import whisper --out /tmp/w/tiny.en
    python benchmarks/whisper_longform.py --ckpt /tmp/w/tiny.en --minutes 10

Speech: Debian's ``asterisk-core-sounds-en`` prompts (real recordings, 8 kHz, with their transcript
file; ``apt-get download asterisk-core-sounds-en asterisk-core-sounds-en-wav`` then ``dpkg-deb -x``
into /tmp/aster/ex), in file order, each followed by a seeded 1-3 s pause, after a silent head of
``--head`` seconds; pauses and head are a noise floor of ``--floor`` RMS (0: digital zeros, on which
tiny.en says "you" sure enough that Whisper's no-speech rule keeps it). The file stays at 8 kHz,
so it is resampled while streamed. Each utterance's
boundaries are where its 10-ms frames rise above -40 dB of its peak. Reported: the share of
utterances with a segment starting (ending) within 0.5 s of their start (end), the long-form WER
against the WER of the same utterances transcribed one by one (errors summed over utterances),
and the real-time factor of both; with ``--vad`` the same for omni with Silero VAD pre-segmentation
(``transcribe(vad=True)``); with ``--faster-whisper DIR`` the same for faster-whisper (the same
algorithm in CTranslate2, greedy) on the same weights, without and (with ``--vad``) with its own
``vad_filter=True``. ``--skip N --seed S`` build another file (from the N-th prompt on, other
pauses) to check a setting away from the default file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from whisper_parity import ASTERISK, asterisk_prompts, wer  # noqa: E402

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

RATE = 8000
TOLERANCE = 0.5


def speech_span(wave: np.ndarray) -> tuple[float, float]:
    """(first, last) second of the 10-ms frames above -40 dB of the clip's peak."""
    frames = wave[: len(wave) // 80 * 80].reshape(-1, 80)
    level = np.sqrt((frames ** 2).mean(1) + 1e-12)
    loud = np.nonzero(level > level.max() * 0.01)[0]
    return loud[0] * 0.01, (loud[-1] + 1) * 0.01


def build(files: list[tuple[Path, str]], minutes: float, head: float, floor: float, out: Path, seed: int = 0):
    """The long wav and each utterance's (start, end, text, file)."""
    rng = np.random.default_rng(seed)

    def pause(seconds: float) -> np.ndarray:
        return (floor * rng.standard_normal(int(seconds * RATE))).astype("float32")

    pieces, spans, at = [pause(head)], [], head
    for wav, text in files:
        wave, sr = sf.read(wav, dtype="float32")
        assert sr == RATE and wave.ndim == 1, (wav, sr)
        lo, hi = speech_span(wave)
        spans.append((at + lo, at + hi, text, wav))
        gap = pause(rng.uniform(1.0, 3.0))
        pieces += [wave, gap]
        at += (len(wave) + len(gap)) / RATE
        if at >= minutes * 60:
            break
    sf.write(out, np.concatenate(pieces), RATE)
    return spans


def scores(segments: list[tuple[float, float, str]], spans) -> dict:
    """Segments against the known utterances: boundaries within 0.5 s, segments in the silent
    head, the long-form WER."""
    starts, ends = [a for a, _, _ in segments], [b for _, b, _ in segments]
    hit_start = [min(abs(t - a) for t in starts) <= TOLERANCE for a, _, _, _ in spans]
    hit_end = [min(abs(t - b) for t in ends) <= TOLERANCE for _, b, _, _ in spans]
    return {"segments": len(segments), "head_segments": sum(a < spans[0][0] - TOLERANCE for a in starts),
            "start_within_0.5s": round(float(np.mean(hit_start)), 3),
            "end_within_0.5s": round(float(np.mean(hit_end)), 3),
            "both_within_0.5s": round(float(np.mean([a and b for a, b in zip(hit_start, hit_end)])), 3),
            "wer": round(wer([" ".join(s[2] for s in spans)], [" ".join(t for _, _, t in segments)]), 4)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="/tmp/w/tiny.en", help="an imported Whisper (omni import whisper)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--head", type=float, default=40.0, help="seconds of silence before the first utterance")
    p.add_argument("--floor", type=float, default=1e-3, help="the pauses' noise RMS (default: -60 dBFS)")
    p.add_argument("--asterisk", default=ASTERISK)
    p.add_argument("--out", default="/tmp/w/longform.wav")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--faster-whisper", default=None, metavar="DIR",
                   help="also run faster-whisper on this CTranslate2 folder (the same weights)")
    p.add_argument("--vad", action="store_true",
                   help="also with voice-activity detection (omni and faster-whisper)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time omni's long-form runs this often, interleaved")
    p.add_argument("--skip", type=int, default=0, help="build the file from the N-th prompt on")
    p.add_argument("--seed", type=int, default=0, help="the pauses' seed")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import omni

    files = asterisk_prompts(Path(args.asterisk), 10_000)[args.skip:]
    if not files:
        raise SystemExit(f"no asterisk prompts under {args.asterisk} (see the module docstring)")
    spans = build(files, args.minutes, args.head, args.floor, Path(args.out), seed=args.seed)
    seconds = sf.info(args.out).duration
    pipe = omni.load(args.ckpt)

    systems = {"omni": False, "omni_vad": True} if args.vad else {"omni": False}
    times: dict[str, list[float]] = {name: [] for name in systems}
    segs = {}
    for _ in range(args.repeats):  # interleaved (omni, omni_vad, omni, ...): the load swings alike
        for name, vad in systems.items():
            t0 = time.perf_counter()
            out = pipe.transcribe(args.out, format=None, progress=False, vad=vad)
            times[name].append(time.perf_counter() - t0)
            segs[name] = [(x.start, x.end, x.text) for x in out]
    t0 = time.perf_counter()
    singles = pipe.transcribe([str(s[3]) for s in spans], format="txt", progress=False)
    single_s = time.perf_counter() - t0
    refs = [s[2] for s in spans]
    results = {"audio_s": round(seconds, 1), "utterances": len(spans),
               "speech_starts_s": round(spans[0][0], 2), "load_average": os.getloadavg()[0],
               **{name: {**scores(segs[name], spans), "rtf": round(min(times[name]) / seconds, 4),
                         "rtf_each": [round(t / seconds, 4) for t in times[name]]} for name in systems},
               "omni_per_utterance": {
                   "wer": round(wer(refs, singles), 4),
                   "rtf": round(single_s / sum(sf.info(str(s[3])).duration for s in spans), 4)}}
    segments = segs["omni"]
    if args.faster_whisper:  # the same algorithm in CTranslate2, on the same weights: a reference
        from faster_whisper import WhisperModel, decode_audio

        fw = WhisperModel(args.faster_whisper, device="cpu", compute_type="float32", cpu_threads=args.threads)
        for key, vad_filter in [("faster_whisper", False)] + [("faster_whisper_vad", True)] * args.vad:
            t0 = time.perf_counter()
            out, _ = fw.transcribe(decode_audio(args.out, sampling_rate=16000), beam_size=1, best_of=1,
                                   language="en", condition_on_previous_text=False, vad_filter=vad_filter)
            fw_segments = [(x.start, x.end, x.text.strip()) for x in out]
            rtf = round((time.perf_counter() - t0) / seconds, 4)
            results[key] = {**scores(fw_segments, spans), "rtf": rtf}
    results["load_average_end"] = os.getloadavg()[0]
    for a, b, text in segments[:8]:
        print(f"{a:8.2f} {b:8.2f}  {text}", file=sys.stderr)
    config = {"ckpt": args.ckpt, "minutes": args.minutes, "skip": args.skip, "seed": args.seed,
              "head_s": args.head, "floor": args.floor, "repeats": args.repeats}
    return json_line("whisper_longform", args.threads, config, results)


if __name__ == "__main__":
    main()
