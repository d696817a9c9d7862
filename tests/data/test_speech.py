"""Speech and sound corpus builders: real espeak-ng / flite / piper speech and Tux Paint sounds."""

import random
import shutil

import numpy as np
import pytest
import soundfile as sf

from omni.data import speech
from omni.data.images import STAMPS_DIR
from omni.data.speech import (
    build_sounds_corpus,
    build_speech_corpus,
    grammar_sentence,
    grammar_vocabulary,
    manifest_audio,
    number_words,
    speech_counts,
    voices_by_split,
    wiki_sentences,
)
from omni.io import read_jsonl

needs_tts = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")),
                               reason="needs apt-get install espeak-ng flite")


def test_grammar_is_closed_and_about_a_hundred_words():
    vocab = grammar_vocabulary()
    assert 90 <= len(vocab) <= 120
    rng = random.Random(0)
    sentences = [grammar_sentence(rng) for _ in range(2000)]
    used = {w for s in sentences for w in s.split()}
    assert used <= vocab and len(used) > 0.9 * len(vocab)
    assert [number_words(n) for n in (1, 13, 40, 42, 100)] == ["one", "thirteen", "forty", "forty two",
                                                               "one hundred"]


def test_speaker_splits_are_disjoint_and_cover_every_accent():
    splits = voices_by_split()
    names = {k: {v.speaker for v in vs} for k, vs in splits.items()}
    assert not names["train"] & names["val"] and not names["train"] & names["test"]
    assert not names["val"] & names["test"]
    for held_out in ("val", "test"):
        assert {v.engine for v in splits[held_out]} == {"espeak", "flite"}
    for accent in speech.ESPEAK_ACCENTS:  # accents are shared; accent+variant combinations are not
        assert any(v.name.startswith(accent + "+") for v in splits["train"])
    assert voices_by_split() == splits  # deterministic


def test_wiki_sentences_are_speakable():
    sentences = wiki_sentences()
    assert len(sentences) > 5000
    assert all(not any(c.isdigit() or c in "()[]" for c in s) for s in sentences[:2000])


@needs_tts
def test_a_slice_of_the_full_corpus_keeps_enough_piper_rows_to_score():
    # --max-rows 2000: the held-out piper voice is scored on 100 utterances (it used to be 2), val
    # stays small (a frozen tower's features are computed for all of it), nothing exceeds the size's own
    assert speech_counts(2000, "full") == {"train": 2000, "val": 200, "test": 500, "test_piper": 100}
    assert speech_counts(8) == {"train": 8, "val": 4, "test": 4, "test_piper": 2}
    assert speech_counts(100_000, "full") == {"train": 100_000, "val": 500, "test": 500, "test_piper": 300}


def test_build_speech_corpus(tmp_path):
    out = tmp_path / "speech"
    counts = build_speech_corpus(out, counts={"train": 6, "val": 2, "test": 2, "test_piper": 1}, seed=0)
    assert counts == {"train": 6, "val": 2, "test": 2, "test_piper": 1}
    rows = {s: list(read_jsonl(out / f"{s}.jsonl")) for s in counts}
    for split, items in rows.items():
        for row in items:
            assert set(row) == {"id", "audio", "text", "speaker", "split", "duration"}
            assert row["split"] == split
    train_speakers = {r["speaker"] for r in rows["train"]}
    assert not train_speakers & {r["speaker"] for r in rows["val"] + rows["test"]}
    assert rows["test_piper"][0]["speaker"] == "piper:joe"
    for path, row in manifest_audio(out / "train.jsonl") + manifest_audio(out / "test_piper.jsonl"):
        info = sf.info(str(path))
        assert (info.samplerate, info.channels) == (16000, 1)
        assert abs(info.duration - row["duration"]) < 1e-3 and 0.5 < row["duration"] < 10
        wave, _ = sf.read(str(path))
        assert np.abs(wave).max() > 0.05  # speech, not silence
    # resumable and deterministic: a second run reuses the files and writes the same manifests
    before = (out / "train.jsonl").read_text()
    build_speech_corpus(out, counts={"train": 6, "val": 2, "test": 2, "test_piper": 1}, seed=0)
    assert (out / "train.jsonl").read_text() == before


def test_missing_tools_and_bad_arguments_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="size must be one of tiny, full"):
        build_speech_corpus(tmp_path, size="huge")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        build_speech_corpus(tmp_path, counts={"dev": 3})
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "flite" else real_which(tool))
    with pytest.raises(ValueError, match="apt-get install flite"):
        build_speech_corpus(tmp_path, counts={"train": 1})
    with pytest.raises(ValueError, match="apt-get install tuxpaint-stamps-default"):
        build_sounds_corpus(tmp_path, stamps_dir=tmp_path / "no_stamps")


def _fake_stamp(root, rel, caption, seed, sr=22050, channels=1):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).uniform(-0.3, 0.3, (sr // 2, channels))
    sf.write(path.with_suffix(".ogg"), noise, sr)
    path.with_suffix(".png").write_bytes(b"\x89PNG")
    path.with_suffix(".txt").write_text(f"{caption}\nfr.utf8=...\n", encoding="utf-8")


def test_sounds_corpus_from_stamp_layout(tmp_path):
    stamps = tmp_path / "stamps"
    for i in range(12):
        _fake_stamp(stamps, f"animals/pets/pet{i}", f"A pet number {i}.", i, channels=1 + i % 2)
    _fake_stamp(stamps, "symbols/letters/O_filled", "The letter O.", 20)
    _fake_stamp(stamps, "symbols/letters/O_outline", "The letter o.", 21)
    sf.write(stamps / "animals/pets/pet0_desc.ogg", np.zeros(1000), 22050)  # a spoken description: skipped
    sf.write(stamps / "animals/pets/pet0_fr.ogg", np.zeros(1000), 22050)  # a spoken name: skipped
    counts = build_sounds_corpus(tmp_path / "sounds", stamps_dir=stamps, val_fraction=0.25,
                                 test_fraction=0.25)
    assert sum(counts.values()) == 14 and min(counts.values()) > 0
    rows = [r for s in counts for r in read_jsonl(tmp_path / "sounds" / f"{s}.jsonl")]
    letters = [r for r in rows if r["stamp"].startswith("symbols/letters")]
    assert len({r["split"] for r in letters}) == 1  # one caption (any case) -> one split
    assert {r["category"] for r in rows} == {"animals", "symbols"}
    for path, row in manifest_audio(tmp_path / "sounds" / "train.jsonl"):
        info = sf.info(str(path))
        assert (info.samplerate, info.channels) == (16000, 1) and abs(info.duration - 0.5) < 0.01
        assert row["duration"] == pytest.approx(info.duration, abs=1e-3)


@pytest.mark.skipif(not STAMPS_DIR.is_dir(), reason="apt-get install tuxpaint-stamps-default")
def test_real_tuxpaint_sounds():
    sounds = speech.stamp_sounds()
    assert len(sounds) > 100
    captions = dict((p.relative_to(STAMPS_DIR).as_posix(), c) for p, c in sounds)
    assert captions.get("animals/birds/seagull.ogg") == "A seagull."
    assert not any("_desc" in p for p in captions)


@needs_tts
@pytest.mark.parametrize("engine,voice", [("espeak", speech.Voice("espeak", "en-us+m1", 50)),
                                          ("flite", speech.Voice("flite", "slt", 170))])
@pytest.mark.parametrize("text", ["-s hello there", "--version of the lights"])
def test_text_starting_with_a_dash_is_spoken_not_parsed_as_an_option(tmp_path, engine, voice, text):
    synth = {"espeak": speech._espeak, "flite": speech._flite}[engine]
    wav = tmp_path / "out.wav"
    synth(voice, text, random.Random(0), wav)
    assert wav.is_file(), f"{engine} wrote nothing for {text!r}"
    wave, sr = sf.read(str(wav))
    assert len(wave) / sr > 0.8 and np.abs(wave).max() > 0.05  # the words, spoken


@needs_tts
def test_rebuilding_with_other_sizes_never_pairs_a_wav_with_another_rows_text(tmp_path, monkeypatch):
    """Each utterance is a function of the seed and its id, and a wav is reused only when it holds
    that utterance: after a rebuild with other split sizes, every row's wav was rendered from its
    own text, the utterances both builds share were not rendered again, and no stale wav is left."""
    renders = []  # (wav path, the text it was rendered from), in order
    real_render = speech._render

    def render(synth, voice, text, seed, out):
        new = not out.is_file()
        duration = real_render(synth, voice, text, seed, out)
        if new:
            renders.append((out, text))
        return duration

    monkeypatch.setattr(speech, "_render", render)
    out = tmp_path / "speech"
    build_speech_corpus(out, counts={"train": 3, "val": 1, "test": 2}, piper=False, workers=1)
    assert len(renders) == 6
    counts = build_speech_corpus(out, counts={"train": 4, "val": 2, "test": 1}, piper=False, workers=1)
    rows = [r for s in counts for r in read_jsonl(out / f"{s}.jsonl")]
    spoken = dict(renders)  # the last render of each path
    for row in rows:
        assert spoken[out / row["audio"]] == row["text"], row["id"]
    rendered_again = [path for path, _ in renders[6:]]
    assert sorted(r["id"] for r in rows
                  if out / r["audio"] in rendered_again) == ["train_000003", "val_000001"]
    assert len(rendered_again) == 2
    assert set((out / "audio").rglob("*.wav")) == {out / r["audio"] for r in rows}  # test_000001's is gone


@needs_tts
def test_a_second_speech_build_of_a_folder_being_built_is_refused(tmp_path, lock_held_elsewhere,
                                                                  folder_files):
    from omni.io import LockedError

    out = tmp_path / "speech"
    build_speech_corpus(out, counts={"train": 1, "val": 1, "test": 1}, piper=False)
    before = folder_files(out)
    with lock_held_elsewhere(out, "speech corpus") as pid:
        with pytest.raises(LockedError,
                           match=rf"this speech corpus is being written by another process \(pid {pid} "):
            build_speech_corpus(out, counts={"train": 2, "val": 1, "test": 1}, piper=False)
    assert folder_files(out) == before


def test_a_second_sounds_build_of_a_folder_being_built_is_refused(tmp_path, lock_held_elsewhere,
                                                                  folder_files):
    from omni.io import LockedError

    stamps = tmp_path / "stamps"
    for i in range(3):
        _fake_stamp(stamps, f"animals/pet{i}", f"A pet number {i}.", i)
    out = tmp_path / "sounds"
    build_sounds_corpus(out, stamps_dir=stamps, limit=2)
    before = folder_files(out)
    with lock_held_elsewhere(out, "sound corpus") as pid:
        with pytest.raises(LockedError,
                           match=rf"this sound corpus is being written by another process \(pid {pid} "):
            build_sounds_corpus(out, stamps_dir=stamps)
    assert folder_files(out) == before
