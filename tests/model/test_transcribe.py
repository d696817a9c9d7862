"""Long-form Whisper transcription (omni/transcribe.py): the window and seek arithmetic, the
temperature fallback and no-speech skip on scripted token streams, the timestamp rules, streaming
(a 75-s file in windows, never whole), the output formats, and the CLI with a corrupt file among
good ones, on the tiny random Whisper of tests/conftest.py."""

import json
import types

import numpy as np
import pytest
import soundfile as sf
import torch

import omni
import omni.transcribe as T
from omni.cli import main
from omni.media.audio import Audio
from omni.model.backbone import Memory
from omni.transcribe import Decoded, Segment, format_segments, snap_to_speech, timestamp_rules


@pytest.fixture(scope="module")
def pipe(hf_whisper_dir):
    return omni.import_hf(hf_whisper_dir)


def _wav(path, seconds, rate=16000, seed=0):
    wave = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))
    sf.write(path, wave.astype("float32"), rate)
    return path


def _stamp(tok, seconds):
    return tok.timestamp_begin + round(seconds / 0.02)


def _script(monkeypatch, outputs):
    """Replace the decoder: the n-th call returns ``outputs[n](tok, temperature)`` for every row;
    records (temperature, window mel shapes) per call."""
    calls = []

    def fake(model, tok, ids, inputs, *, temperature=0.0, memory=None, **_):
        calls.append((temperature, [tuple(s.data.shape) for _, s in inputs["media"]], memory is not None))
        d = outputs[len(calls) - 1](tok, temperature)
        B = ids.shape[0]
        return [d] * B, Memory(torch.zeros(B, 1, 1), torch.zeros(B, 1, dtype=torch.long), None)

    monkeypatch.setattr(T, "decode", fake)
    return calls


def _decoded(tok, *pieces, logprob=-0.2, no_speech=0.0, temperature=0.0):
    """Tokens from floats (timestamps) and str (text)."""
    ids = [t for p in pieces for t in ([_stamp(tok, p)] if isinstance(p, float) else tok.encode(p))]
    text = "".join(p for p in pieces if isinstance(p, str))
    return Decoded(ids, logprob, no_speech, temperature, T.compression_ratio(text))


def test_windows_seek_to_the_last_timestamp_pair_and_skip_silence(pipe, tmp_path, monkeypatch):
    path = _wav(tmp_path / "long.wav", 75)
    read = []
    real_windows = T.iter_audio_windows

    def spy(*args):
        for w in real_windows(*args):
            read.append(len(w))
            yield w

    monkeypatch.setattr(T, "iter_audio_windows", spy)
    monkeypatch.setattr("omni.media.audio.load_audio", None)  # the file is never decoded whole
    calls = _script(monkeypatch, [
        # 0 s: two closed segments and an open one: seek to 12 s, the open text is dropped
        lambda tok, t: _decoded(tok, 0.0, " hello", 5.0, 5.0, " world", 12.0, 12.0, " cut"),
        # 12 s: text closed by a single timestamp (no pair): one segment to it, seek the whole window
        lambda tok, t: _decoded(tok, 0.0, " again", 3.0),
        # 42 s: silence (no-speech probability high, log-probability low): skipped, no fallback
        lambda tok, t: _decoded(tok, 0.0, " noise", 1.0, logprob=-2.0, no_speech=0.9),
        # 72 s: the last 3 s, pairs then a single ending: segments, then seek the window's end
        lambda tok, t: _decoded(tok, 0.5, " end", 2.0, 2.0, " fin", 2.5),
    ])
    segments = pipe.transcribe(path, format=None, progress=False)
    assert segments == [Segment(0.0, 5.0, "hello"), Segment(5.0, 12.0, "world"), Segment(12.0, 15.0, "again"),
                        Segment(72.5, 74.0, "end"), Segment(74.0, 74.5, "fin")]
    assert [c[0] for c in calls] == [0.0] * 4
    assert all(shape == [(80, 3000)] for _, shape, _ in calls)  # one 30-s log-mel per window
    assert read == [480000, 480000, 240000]  # streamed in 30-s chunks


def test_fallback_redecodes_repetitive_or_unsure_windows_at_higher_temperatures(pipe, tmp_path, monkeypatch):
    path = _wav(tmp_path / "a.wav", 4)
    calls = _script(monkeypatch, [
        lambda tok, t: _decoded(tok, 0.0, " la" * 40, 4.0, temperature=t),  # compression ratio > 2.4
        lambda tok, t: _decoded(tok, 0.0, " unsure", 4.0, logprob=-1.5, temperature=t),  # logprob < -1
        lambda tok, t: _decoded(tok, 0.0, " fine words", 4.0, temperature=t),
    ])
    assert pipe.transcribe(path, format="txt", progress=False) == "fine words\n"
    assert [c[0] for c in calls] == [0.0, 0.2, 0.4]
    assert [c[2] for c in calls] == [False, True, True]  # the window is encoded once


def test_silence_gives_an_empty_transcript(pipe, tmp_path, monkeypatch):
    sf.write(tmp_path / "silence.wav", np.zeros(16000 * 40, "float32"), 16000)
    silent = lambda tok, t: _decoded(tok, 0.0, " um", 1.0, logprob=-3.0, no_speech=0.95)  # noqa: E731
    calls = _script(monkeypatch, [silent] * 2)
    assert pipe.transcribe(tmp_path / "silence.wav", format="json", language="de", progress=False) == \
        '{"text": "", "language": "de", "segments": []}\n'
    assert len(calls) == 2  # two windows, both skipped; never retried at another temperature


def test_speech_chunks_are_read_at_their_place_in_the_file_and_nothing_between(tmp_path):
    sf.write(tmp_path / "ramp.wav", np.arange(16000 * 100, dtype="float32") / 16000 / 100, 16000)
    chunks = [(16000 * 40, 16000 * 45), (16000 * 80, 16000 * 95)]  # skip 40 s, then 35 s
    stream = T.AudioStream(tmp_path / "ramp.wav", chunks)
    at, wave = stream.window(0)
    assert at == 16000 * 40 and len(wave) == 16000 * 5 and abs(wave[0].item() - 0.4) < 1e-4
    at, wave = stream.window(16000 * 45)  # the first chunk is done: on to the next
    assert at == 16000 * 80 and len(wave) == 16000 * 15 and abs(wave[0].item() - 0.8) < 1e-4
    at, wave = stream.window(16000 * 95 - 100)  # less than one timestamp step left: done
    assert len(wave) == 0


def test_segments_take_the_speech_boundaries():
    regions = [(1.0, 3.0), (5.0, 9.0), (12.0, 13.0)]
    segments = [Segment(0.5, 2.5, "a"),  # one region: its start and end
                Segment(4.6, 6.0, "b"), Segment(6.0, 10.0, "c"),  # two in a region: the cut is kept
                Segment(10.5, 11.0, "d"),  # between regions: the nearest (12-13)
                ]
    assert snap_to_speech(segments, regions) == [
        Segment(1.0, 3.0, "a"), Segment(5.0, 6.0, "b"), Segment(6.0, 9.0, "c"), Segment(12.0, 13.0, "d")]
    merged = [Segment(0.0, 8.0, "a b")]  # over two regions: from the first's start to the last's end
    assert snap_to_speech(merged, regions) == [Segment(1.0, 9.0, "a b")]
    assert snap_to_speech(segments, []) == segments


def test_vad_decodes_only_the_speech_chunks_and_snaps_segments(pipe, tmp_path, monkeypatch):
    path = _wav(tmp_path / "long.wav", 100)
    regions = [(16000 * 40, 16000 * 42), (16000 * 50, 16000 * 55), (16000 * 80, 16000 * 99)]
    monkeypatch.setattr(T, "SileroVAD", lambda: None)
    monkeypatch.setattr(T, "speech_regions", lambda path, vad: regions)
    calls = _script(monkeypatch, [
        # the 40-55 s chunk (15 s): two segments, Whisper's times a little off
        lambda tok, t: _decoded(tok, 0.0, " one", 2.4, 9.6, " two", 15.0),
        # the 80-99 s chunk: one segment
        lambda tok, t: _decoded(tok, 0.4, " three", 18.0),
    ])
    assert pipe.transcribe(path, format=None, progress=False, vad=True) == [
        Segment(40.0, 42.0, "one"), Segment(50.0, 55.0, "two"), Segment(80.0, 99.0, "three")]
    assert len(calls) == 2  # the silent head and the pauses between chunks are never decoded
    sf.write(tmp_path / "silence.wav", np.zeros(16000 * 40, "float32"), 16000)
    monkeypatch.setattr(T, "speech_regions", lambda path, vad: [])
    assert pipe.transcribe(tmp_path / "silence.wav", format="txt", progress=False, vad=True) == "\n"
    assert len(calls) == 2


def test_vad_decodes_regions_alone_when_whisper_writes_one_segment_over_a_pause(pipe, tmp_path, monkeypatch):
    path = _wav(tmp_path / "digits.wav", 60)
    regions = [(16000 * a, 16000 * b) for a, b in ((40, 42), (45, 47), (50, 52))]  # one 12-s chunk
    monkeypatch.setattr(T, "SileroVAD", lambda: None)
    monkeypatch.setattr(T, "speech_regions", lambda path, vad: regions)
    calls = _script(monkeypatch, [
        lambda tok, t: _decoded(tok, 0.0, " one two", 7.0, 7.0, " three", 12.0),  # over the 42-45 s pause
        lambda tok, t: _decoded(tok, 0.0, " one", 2.0),  # 40-42 s alone
        lambda tok, t: _decoded(tok, 0.2, " two", 1.8),  # 45-47 s alone
        lambda tok, t: _decoded(tok, 3.0, " three", 5.0),  # the rest of the chunk, 47-52 s
    ])
    assert pipe.transcribe(path, format=None, progress=False, vad=True) == [
        Segment(40.0, 42.0, "one"), Segment(45.0, 47.0, "two"), Segment(50.0, 52.0, "three")]
    assert len(calls) == 4


def test_vad_on_a_real_silent_file_decodes_nothing(pipe, tmp_path, monkeypatch):
    pytest.importorskip("silero_vad", reason="silero-vad not installed (omni's speech extra)")
    sf.write(tmp_path / "silence.wav", np.zeros(16000 * 40, "float32"), 16000)
    calls = _script(monkeypatch, [])
    assert pipe.transcribe(tmp_path / "silence.wav", format=None, progress=False, vad=True) == []
    assert calls == []


def test_language_is_detected_once_per_file_on_its_first_window_and_used(pipe, tmp_path, monkeypatch):
    tok = pipe.tokenizer
    a, b = _wav(tmp_path / "a.wav", 65, seed=4), _wav(tmp_path / "b.wav", 5, seed=5)
    detected, decoded_ids = [], []
    real_detect = T.detect_language

    def spy_detect(model, tok, ids, inputs):
        out = real_detect(model, tok, ids, inputs)
        detected.append(out)
        return out

    def fake_decode(model, tok, ids, inputs, **_):
        decoded_ids.append(ids.clone())
        B = ids.shape[0]
        memory = Memory(torch.zeros(B, 1, 1), torch.zeros(B, 1, dtype=torch.long), None)
        return [_decoded(tok, 0.0, " x", 30.0)] * B, memory

    monkeypatch.setattr(T, "detect_language", spy_detect)
    monkeypatch.setattr(T, "decode", fake_decode)
    out = pipe.transcribe([a, b], format=None, batch_size=2, progress=False)
    assert [len(d) for d in detected] == [2]  # both files' first windows, in one pass; never again
    langs = [lang for lang, _ in detected[0]]
    assert [t.language for t in out] == langs
    # openai's detection: the language-token distribution after <|startoftranscript|> alone
    wave = T.AudioStream(a).window(0)[1]
    for prompt_lang in ("en", "de"):  # the decoder is causal: what follows the sot does not matter
        _, inputs = pipe.processor.batch([[Audio(wave, sample_rate=16000)]], language=prompt_lang,
                                         timestamps=True)
        ids = torch.tensor([tok.prompt(prompt_lang, timestamps=True)])
        logits = pipe.model(ids, positions=inputs["positions"], media=inputs["media"]).logits[0, 0]
        lang_ids = list(tok.languages.values())
        assert list(tok.languages)[int(logits[lang_ids].argmax())] == langs[0]
    sot = (decoded_ids[0] == tok.sot).long().argmax(1)
    assert decoded_ids[0][torch.arange(2), sot + 1].tolist() == [tok.languages[x] for x in langs]
    assert all(d[0, sot[0] + 1] == tok.languages[langs[0]] for d in decoded_ids[1:])  # a's later windows

    monkeypatch.setattr(T, "detect_language", None)  # a given language, or an English-only Whisper: none
    as_json = pipe.transcribe(b, format="json", language="de", progress=False)
    assert as_json.startswith('{"text": "x", "language": "de"')
    assert decoded_ids[-1][0, sot[0] + 1] == tok.languages["de"]
    monkeypatch.setattr(tok, "multilingual", False)
    assert pipe.transcribe(b, format=None, progress=False).language == "en"
    last = decoded_ids[-1][0].tolist()
    assert tok.sot in last and not set(last) & set(tok.languages.values())


def test_timestamp_rules(pipe):
    tok = pipe.tokenizer
    b, V, eot = tok.timestamp_begin, pipe.vocab.size, tok.eot  # text ids are those below eot
    allowed = lambda seq: (timestamp_rules(torch.zeros(1, V), [seq], tok)[0] > -1e9).nonzero()[:, 0].tolist()  # noqa
    assert allowed([]) == list(range(b, b + 51))  # a first timestamp, at most 1.00
    text = tok.encode(" hi")
    after_single = allowed([b + 10, *text, b + 20])  # a lone timestamp closes a segment: no text
    assert min(t for t in after_single if t >= b) == b + 20
    assert not any(t < eot for t in after_single)
    after_pair = allowed([b + 10, *text, b + 20, b + 20])  # after a pair: text or the end, no timestamp
    assert not any(b <= t < b + 1501 for t in after_pair) and text[0] in after_pair
    assert tok.no_timestamps not in allowed([b, *text])
    assert min(t for t in allowed([b + 30, *text]) if t >= b) == b + 31  # never decreasing
    logits = torch.zeros(1, V)
    logits[0, b:b + 1501] = 5.0  # timestamps together more likely than any text token: a timestamp
    assert (timestamp_rules(logits, [[b, *text]], tok)[0, :b] == float("-inf")).all()


def test_real_decoding_streams_a_75_s_file_and_batches_files(pipe, tmp_path):
    a, b = _wav(tmp_path / "a.wav", 75, seed=1), _wav(tmp_path / "b.wav", 20, rate=8000, seed=2)
    opts = dict(format=None, temperatures=(0.0,), beam_size=2, progress=False)
    one = [pipe.transcribe(p, **opts) for p in (a, b)]
    both = pipe.transcribe([a, b], batch_size=2, **opts)
    assert both == one  # several files' windows decoded together = one at a time
    for segments, seconds in zip(both, (75, 20)):
        assert all(0 <= s.start < s.end <= seconds + 30 for s in segments)
        assert [s.start for s in segments] == sorted(s.start for s in segments)
    stream = T.AudioStream(b)  # 8 kHz is resampled to 16 kHz
    assert len(stream.window(0)[1]) == 20 * 16000 and len(stream.window(20 * 16000)[1]) == 0


def _forced_logprob(pipe, ids, inputs, tokens):
    """The summed log-probability of ``tokens`` + the end, teacher-forced without a cache, under the
    same suppression and timestamp rules."""
    tok = pipe.tokenizer
    full = torch.cat([ids[0], torch.tensor(tokens + [tok.eot])])[None]
    logits = pipe.model(full, positions=torch.arange(full.shape[1])[None], media=inputs["media"]).logits[0]
    rules = T._Rules(tok, "cpu")
    return sum(float(rules(logits[ids.shape[1] - 1 + i][None], [tokens[:i]], i).float().log_softmax(-1)[0, t])
               for i, t in enumerate(tokens + [tok.eot]))


@torch.no_grad()
def test_greedy_and_beam_scores_are_their_tokens_log_probabilities_and_rows_do_not_mix(pipe):
    tok = pipe.tokenizer
    noise = [0.1 * torch.randn(16000 * s, generator=torch.Generator().manual_seed(s)) for s in (7, 12)]
    waves = [Audio(w, sample_rate=16000) for w in noise]
    rendered, inputs = pipe.processor.batch([[w] for w in waves], timestamps=True)
    ids = torch.stack([r.ids for r in rendered])
    for beam in (1, 3):
        both, _ = T.decode(pipe.model, tok, ids, inputs, beam_size=beam, max_new_tokens=20)
        for row, d in enumerate(both):
            one_r, one_in = pipe.processor.batch([[waves[row]]], timestamps=True)
            alone, _ = T.decode(pipe.model, tok, one_r[0].ids[None], one_in, beam_size=beam,
                                max_new_tokens=20)
            assert alone[0].tokens == d.tokens and abs(alone[0].avg_logprob - d.avg_logprob) < 1e-4
            forced = _forced_logprob(pipe, one_r[0].ids[None], one_in, d.tokens)
            assert abs(forced - d.avg_logprob * (len(d.tokens) + 1)) < 1e-3, (beam, row)


def test_formats():
    segs = [Segment(0.0, 2.5, "Hello there."), Segment(3661.25, 3662.0, "Bye.")]
    assert format_segments(segs, "txt") == "Hello there. Bye.\n"
    assert json.loads(format_segments(T.Transcript(segs, "en"), "json")) == {
        "text": "Hello there. Bye.", "language": "en",
        "segments": [{"start": 0.0, "end": 2.5, "text": "Hello there."},
                     {"start": 3661.25, "end": 3662.0, "text": "Bye."}]}
    assert json.loads(format_segments(segs, "json"))["language"] is None  # a bare list says nothing
    assert format_segments(segs, "srt") == ("1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
                                            "2\n01:01:01,250 --> 01:01:02,000\nBye.\n\n")
    assert format_segments(segs, "vtt") == ("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
                                            "01:01:01.250 --> 01:01:02.000\nBye.\n\n")
    assert format_segments(segs, "tsv") == "start\tend\ttext\n0\t2500\tHello there.\n3661250\t3662000\tBye.\n"
    with pytest.raises(ValueError, match="format must be one of"):
        format_segments(segs, "doc")


def test_only_whisper_checkpoints_transcribe(pipe):
    with pytest.raises(ValueError, match="needs a Whisper checkpoint"):
        T.transcribe_files(pipe.model, types.SimpleNamespace(tokenizer=None), ["a.wav"])
    with pytest.raises(ValueError, match="unknown language"):
        pipe.transcribe(["a.wav"], language="xx")


def test_cli_writes_each_good_file_and_an_error_line_for_a_corrupt_one(pipe, tmp_path, capsys, monkeypatch):
    ckpt = pipe.save_pretrained(tmp_path / "ckpt")
    good = [_wav(tmp_path / "one.wav", 3), _wav(tmp_path / "two.wav", 2, rate=8000, seed=3)]
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC but nothing else" * 10)
    files = [good[0], corrupt, good[1]]
    out_dir = tmp_path / "out"
    assert main(["transcribe", "--ckpt", str(ckpt), "--format", "srt", "--output-dir", str(out_dir),
                 "--language", "de", "--beam-size", "2", *map(str, files)]) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(good[0]), str(good[1])]
    assert f"{corrupt}\tERROR: " in err and "1 of 3 files failed" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["one.srt", "two.srt"]
    assert main(["transcribe", "--ckpt", str(ckpt), "--format", "vtt", str(good[0])]) == 1  # needs a dir
    assert "--output-dir" in capsys.readouterr().err
    monkeypatch.setattr(T, "SileroVAD", lambda: None)
    monkeypatch.setattr(T, "speech_regions", lambda path, vad: [*T.iter_audio_windows(path, 30.0)] and [])
    # --vad reads each file and finds no speech: an empty line, and the corrupt file's error
    assert main(["transcribe", "--ckpt", str(ckpt), "--vad", str(good[0]), str(corrupt)]) == 1
    assert capsys.readouterr().out == f"{good[0]}\t\n"
