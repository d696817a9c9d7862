"""``omni demo``: the project's main job, end to end on one CPU machine.

1. builds the offline corpora (Wikipedia paragraphs, synthesized speech, Tux Paint sounds, images
   and moving-stamp videos) under ``<out>/data``;
2. trains a small audio codec for a few minutes (``tokenizers/audio_codec_tiny``, time-boxed);
3. trains ``any2any/tiny``, one checkpoint over seven tasks;
4. scores every task on its held-out split (``omni eval``);
5. shows each direction on held-out files through the public API: transcribes speech, continues
   audio, captions an image, a sound and a video, speaks a sentence (and transcribes what it
   said), completes text;
6. writes ``<out>/report.md``: the loss curve, the scores, and links to every produced file.

Steps whose outputs exist are skipped, so an interrupted demo resumes where it stopped. Each step
announces itself (``[3/5] ...``) and every part of it that takes more than a few seconds shows
progress in its own units (stamps, utterances, files, rows, steps) with an ETA: a bar on a terminal,
a log line every ~10% in a log file (:mod:`omni.progress`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import omni
from omni.api import media_for
from omni.config import RecipeConfig, apply_overrides, find_recipe, from_dict, read_yaml
from omni.data.images import build_images_corpus
from omni.data.speech import build_sounds_corpus, build_speech_corpus, speech_counts
from omni.data.text import build_text_corpus
from omni.data.video import build_video_corpus
from omni.eval import HEADLINE, evaluate, headline, headlines, score_split  # noqa: F401  (the demo's scores are omni eval's)
from omni.io import atomic_write_bytes, read_jsonl
from omni.progress import progress
from omni.train import train
from omni.train.codec import load_codec_spec
from omni.train.codec import train_codec as _train

RECIPE = "any2any/tiny"
CORPORA = ("text", "speech", "sounds", "images", "video")


@dataclass
class Shown:
    """One direction shown on a held-out file: what went in, what came out, and the reference."""

    direction: str
    inputs: list[str]
    output: str
    reference: str = ""
    files: list[str] = field(default_factory=list)


def build_corpora(data: Path, say=print, max_docs: int | None = None) -> None:
    """Every corpus the recipe reads; ``max_docs`` keeps each media corpus to about that many
    documents (the text corpus stays whole: the tokenizer's 4,096 pieces need it)."""
    n = max_docs
    speech = speech_counts(n) if n else None
    builders = {"text": build_text_corpus,
                "speech": lambda out: build_speech_corpus(out, counts=speech),
                "sounds": lambda out: build_sounds_corpus(out, limit=n),
                "images": lambda out: build_images_corpus(out, max_stamps=n),
                "video": lambda out: build_video_corpus(out, max_stamps=min(n or 40, 40))}
    for kind in CORPORA:
        out = data / kind
        if (out / "test.jsonl").is_file():
            say(f"      {kind}: already in {out}")
            continue
        say(f"      {kind}: building {out} ...")
        t = time.perf_counter()
        builders[kind](out)
        say(f"      {kind}: done ({time.perf_counter() - t:.0f} s)")


def train_codec(data: Path, out: Path, minutes: float) -> dict:
    spec = load_codec_spec("audio_codec_tiny", [
        f"train_manifests=[{data}/speech/train.jsonl, {data}/sounds/train.jsonl]",
        f"val_manifests=[{data}/speech/val.jsonl, {data}/sounds/val.jsonl]",
        f"out={out}", f"max_minutes={minutes}", "num_val_clips=16"])
    return _train(spec)


def demo_recipe(out: Path, overrides: list[str]):
    """``any2any/tiny`` with every path under ``out`` (corpora, tokenizer, codec, run)."""
    raw = read_yaml(find_recipe(RECIPE))
    raw["name"] = RECIPE
    for part in raw["data"]["mixture"]:
        part["path"] = str(out / part["path"])  # data/<kind> -> <out>/data/<kind>
    raw["tokenizer"]["path"] = str(out / "tokenizer")
    raw["codec"]["path"] = str(out / "codec")
    raw["train"]["out_dir"] = str(out / "any2any_tiny")
    cfg = from_dict(RecipeConfig, apply_overrides(raw, overrides))
    cfg.validate()
    return cfg


def _first(manifest: Path) -> dict:
    return next(iter(read_jsonl(manifest)))


def show_directions(model, data: Path, media_dir: Path, progress_bar: bool | None = None) -> list[Shown]:
    """Each direction once, on the first held-out (test) row of its corpus (~30 s of generate calls
    on a CPU: a progress bar or log line counts the directions)."""
    media_dir.mkdir(parents=True, exist_ok=True)

    def keep(src: Path) -> str:  # inputs are copied next to the report so its links work anywhere
        dst = media_dir / src.name
        shutil.copy(src, dst)
        return str(dst)

    speech = _first(data / "speech" / "test.jsonl")
    wav = data / "speech" / speech["audio"]
    sentence = speech["text"]

    def transcribe() -> Shown:
        return Shown("speech -> text", [keep(wav)], model.generate([omni.Audio(wav)], max_new_tokens=32),
                     sentence)

    def continue_audio() -> Shown:
        clip = omni.Audio(wav)
        head = omni.Audio(clip.waveform[: int(1.0 * clip.sample_rate)], clip.sample_rate)
        head.save(media_dir / "continue_prompt.wav")
        cont = model.generate(["Continue:", head], output="audio", max_seconds=2.0, temperature=0.8, top_k=50,
                              seed=0)
        cont.save(media_dir / "continue_output.wav")
        return Shown("audio -> audio (continue 1 s)", [str(media_dir / "continue_prompt.wav")],
                     f"{cont.duration:.2f} s of audio", files=[str(media_dir / "continue_output.wav")])

    def caption(direction: str, kind: str, key: str, prompt_text: str):
        def show() -> Shown:
            row = _first(data / kind / "test.jsonl")
            path = data / kind / row[key]
            text = model.generate([media_for(model, path), prompt_text], max_new_tokens=24)
            return Shown(direction, [keep(path)], text, row.get("caption") or row.get("text", ""))
        return show

    def speak() -> Shown:
        spoken = model.generate(["Say:", sentence], output="audio", max_seconds=3.0, temperature=0.8,
                                top_k=50, seed=0)
        spoken.save(media_dir / "speak_output.wav")
        heard = model.generate([omni.Audio(media_dir / "speak_output.wav")], max_new_tokens=32)
        return Shown("text -> audio (speak)", [sentence],
                     f"{spoken.duration:.2f} s of audio; the model itself "
                     f"transcribes it as: \"{heard}\"", sentence, [str(media_dir / "speak_output.wav")])

    def text() -> Shown:
        return Shown("text -> text", ["The history of"], model.generate("The history of", max_new_tokens=32))

    directions = [transcribe, continue_audio, caption("image -> text", "images", "image", "Caption:"),
                  caption("sound -> text", "sounds", "audio", "Caption:"),
                  caption("video -> text", "video", "video", "Describe the motion."), speak, text]
    return [show() for show in progress(directions, desc="demo: each direction on a held-out file",
                                        unit="direction", enabled=progress_bar)]


def write_report(out: Path, run: Path, scores: dict, shown: list[Shown], timings: dict,
                 codec: dict) -> Path:
    def link(p: str) -> str:
        rel = (Path(p).resolve().relative_to(out.resolve())
               if Path(p).resolve().is_relative_to(out.resolve()) else p)
        return f"[{Path(p).name}]({rel})"

    lines = ["# omni demo: one checkpoint, every direction", "",
             f"`{RECIPE}` trained on CPU; the model is `{run}` (`omni.load(\"{run}\")`).", "",
             "## Time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    if (run / "loss.png").is_file():
        lines += ["", "## Training loss", "", f"![loss]({(run / 'loss.png').relative_to(out)})"]
    lines += ["", "## Held-out scores (test split)", "", "| task | rows | headline | all metrics |",
              "|---|---|---|---|"]
    for label, m in scores.get("tasks", {}).items():
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("rows",)}
        lines.append(f"| {label} | {m.get('rows', '')} | {headline(m.get('task', ''), m)} | "
                     + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()) + " |")
    if codec:
        lines += ["", f"Codec ({codec.get('steps', '?')} steps): held-out mel distance "
                  f"{codec.get('before', {}).get('mel_distance', float('nan')):.3f} -> "
                  f"{codec.get('after', {}).get('mel_distance', float('nan')):.3f}."]
    lines += ["", "## Each direction on a held-out file", "", "| direction | input | output | reference |",
              "|---|---|---|---|"]
    for s in shown:
        ins = ", ".join(link(i) if Path(i).exists() else f"\"{i}\"" for i in s.inputs)
        outs = s.output + "".join(f" ({link(f)})" for f in s.files)
        lines.append(f"| {s.direction} | {ins} | {outs} | {s.reference} |")
    lines.append("")
    report = out / "report.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    atomic_write_bytes(out / "report.json",
                       json.dumps({"scores": scores, "timings": timings, "codec": codec,
                                   "shown": [s.__dict__ for s in shown]}, indent=1).encode())
    return report


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | None = None, codec_minutes: float = 3.0,
             eval_rows: int | None = None, max_docs: int | None = None, say=print) -> Path | None:
    """The whole demo; returns the report's path, or None when a signal stopped the training (its
    checkpoint is saved, and running the demo again resumes it)."""
    out = Path(out)
    data = out / "data"
    timings: dict[str, float] = {}
    t = time.perf_counter()
    say(f"[1/5] corpora under {data}")
    build_corpora(data, say, max_docs)
    timings["corpora"] = time.perf_counter() - t

    t = time.perf_counter()
    codec_dir, codec = out / "codec", {}
    if (codec_dir / "config.json").is_file():
        say(f"[2/5] codec already in {codec_dir}")
    else:
        say(f"[2/5] training the audio codec for {codec_minutes:g} min -> {codec_dir}")
        codec = train_codec(data, codec_dir, codec_minutes)
        atomic_write_bytes(out / "codec_report.json", json.dumps(codec, default=str).encode())
    if not codec and (out / "codec_report.json").is_file():
        codec = json.loads((out / "codec_report.json").read_text())
    timings["codec"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = demo_recipe(out, overrides or [])
    run = Path(cfg.train.out_dir)
    if (run / "model.safetensors").is_file() and (run / "eval_test.json").is_file():
        say(f"[3/5] model already trained in {run}")
    else:
        say(f"[3/5] training {RECIPE}: {len(cfg.data.mixture)} tasks, {cfg.train.steps} steps"
            + (f" or {cfg.train.max_minutes:g} min" if cfg.train.max_minutes else "") + f" -> {run}")
        say("      first the tokenizer (when missing), then each task's rows rendered and codec-encoded "
            "into a cache (once), then the steps")
        res = train(cfg, score=score_split)
        if res.stopped_by:
            say(f"stopped by {res.stopped_by} after step {res.steps}; run the same command again to resume")
            return None
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[4/5] scoring every task on its test split")
    scores = evaluate(run, split="test", max_rows=eval_rows)
    for line in headlines(scores):
        say(f"      {line}")
    timings["eval"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[5/5] each direction on a held-out file")
    model = omni.load(run)
    shown = show_directions(model, data, out / "media")
    for s in shown:
        say(f"      {s.direction}: {s.output}" + (f"   (reference: {s.reference})" if s.reference else ""))
    timings["show"] = time.perf_counter() - t
    report = write_report(out, run, scores, shown, timings, codec)
    say(f"\nreport: {report}   (media in {out / 'media'}, model in {run})")
    return report
