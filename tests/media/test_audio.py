"""omni.media.audio: decoding real files of every supported format, mixing, resampling, windows, bad input."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from omni.media import MediaError
from omni.media.audio import Audio, iter_audio_windows, load_audio


def tone(freq=440.0, sr=16000, seconds=1.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def peak_hz(wave: torch.Tensor, sr: int) -> float:
    spec = torch.fft.rfft(wave).abs()
    return spec.argmax().item() * sr / wave.shape[0]


def write_pyav(path, x: np.ndarray, sr: int, codec="aac"):
    """A real m4a/mp4 audio file encoded by FFmpeg (through PyAV)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray(x[None], format="fltp", layout="mono")
        frame.sample_rate = sr
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.mark.parametrize("ext,tol", [("wav", 1e-4), ("flac", 1e-4), ("ogg", None), ("mp3", None)])
def test_formats_decode_via_soundfile(tmp_path, ext, tol):
    x = tone()
    path = tmp_path / f"a.{ext}"
    sf.write(path, x, 16000)
    wave, sr = load_audio(path)
    assert sr == 16000 and wave.dtype == torch.float32 and wave.dim() == 1
    if tol:
        assert wave.shape[0] == x.shape[0]
        assert torch.allclose(wave, torch.from_numpy(x), atol=tol)
    else:  # lossy: same length within a frame or so, same pitch
        assert abs(wave.shape[0] - x.shape[0]) < 2000
        assert abs(peak_hz(wave, sr) - 440) < 5


@pytest.mark.parametrize("ext", ["m4a", "mp4"])
def test_formats_soundfile_cannot_read_fall_back_to_pyav(tmp_path, ext):
    path = tmp_path / f"a.{ext}"
    write_pyav(path, tone(), 16000)
    with pytest.raises(sf.LibsndfileError):  # the premise: libsndfile cannot read AAC
        sf.info(str(path))
    wave, sr = load_audio(path, sample_rate=8000)
    assert sr == 8000 and abs(wave.shape[0] - 8000) < 1200
    assert abs(peak_hz(wave, sr) - 440) < 5


def test_six_channels_are_averaged(tmp_path):
    levels = np.array([0.1, 0.2, 0.3, -0.1, 0.4, 0.5], dtype=np.float32)
    path = tmp_path / "surround.wav"
    sf.write(path, np.tile(levels, (1000, 1)), 48000, subtype="FLOAT")
    wave, _sr = load_audio(path)
    assert wave.shape == (1000,) and torch.allclose(wave, torch.full((1000,), levels.mean()), atol=1e-6)
    multi, _ = load_audio(path, mono=False)
    assert multi.shape == (6, 1000) and torch.allclose(multi[:, 0], torch.from_numpy(levels))


@pytest.mark.parametrize("orig", [8000, 96000])
def test_resampling_keeps_pitch_and_duration(tmp_path, orig):
    path = tmp_path / f"tone_{orig}.wav"
    sf.write(path, tone(440, orig, 1.0), orig)
    wave, sr = load_audio(path, sample_rate=16000)
    assert sr == 16000 and wave.shape[0] == 16000
    assert abs(peak_hz(wave, sr) - 440) <= 1
    assert 0.3 < wave.abs().max() < 0.6


def test_silence_and_one_sample_load(tmp_path):
    sf.write(tmp_path / "silence.wav", np.zeros(16000, np.float32), 16000)
    wave, _ = load_audio(tmp_path / "silence.wav")
    assert wave.shape == (16000,) and wave.abs().max() == 0
    sf.write(tmp_path / "one.wav", np.array([0.25], np.float32), 16000, subtype="FLOAT")
    wave, sr = load_audio(tmp_path / "one.wav")
    assert wave.tolist() == [0.25] and sr == 16000
    assert load_audio(tmp_path / "one.wav", sample_rate=32000)[0].shape == (2,)


def _expect(path_or_name, fn, *phrases):
    with pytest.raises(MediaError) as e:
        fn()
    msg = str(e.value)
    assert str(path_or_name) in msg, msg
    for p in phrases:
        assert p in msg, msg
    assert isinstance(e.value, ValueError)


def test_bad_files_raise_media_error_naming_file_and_problem(tmp_path):
    missing = tmp_path / "missing.wav"
    _expect(missing, lambda: load_audio(missing), "not found")
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    _expect(empty, lambda: load_audio(empty), "empty")
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"this is a text file, not audio\n" * 20)
    _expect(junk, lambda: load_audio(junk), "not a readable audio file")
    _expect(tmp_path, lambda: load_audio(tmp_path), "not a regular file")


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_truncated_files_are_errors(tmp_path, ext):
    full = tmp_path / f"full.{ext}"
    sf.write(full, np.random.default_rng(0).uniform(-0.5, 0.5, 32000).astype(np.float32), 16000)
    cut = tmp_path / f"cut.{ext}"
    data = full.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(MediaError) as e:
        load_audio(cut)
    assert str(cut) in str(e.value)
    assert "truncated" in str(e.value) or "not a readable audio file" in str(e.value)


def test_nan_and_inf_samples_are_errors(tmp_path):
    x = tone()
    x[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    _expect(path, lambda: load_audio(path), "NaN or infinite")
    _expect("Tensor", lambda: Audio(torch.tensor([0.0, float("inf")]), 16000), "NaN or infinite")


def test_bad_tensors(tmp_path):
    _expect("Tensor", lambda: Audio(torch.zeros(100)), "sample_rate is required")
    _expect("int16", lambda: Audio(torch.zeros(100, dtype=torch.int16), 16000), "not a float type")
    _expect("Tensor", lambda: Audio(torch.zeros(1, 2, 100), 16000), "3 dimensions")
    _expect("(1000, 2)", lambda: Audio(torch.zeros(1000, 2), 16000), "looks like (T, C)")
    _expect("Tensor", lambda: Audio(torch.zeros(0), 16000), "0 frames")
    _expect("list", lambda: Audio([0.0, 0.1], 16000), "file path")


def test_audio_object_is_lazy_and_round_trips(tmp_path):
    lazy = Audio(tmp_path / "later.wav")  # nothing read yet: the file does not exist
    assert lazy.path == tmp_path / "later.wav" and "not decoded" in repr(lazy)
    a = Audio(np.stack([tone(), tone()]), sample_rate=16000)  # (C, T) numpy: mixed to mono
    assert a.path is None and a.waveform.shape == (16000,) and a.duration == 1.0
    for ext in ("wav", "flac", "ogg"):
        a.save(tmp_path / f"out.{ext}")
        b = Audio(tmp_path / f"out.{ext}")
        assert b.sample_rate == 16000 and abs(b.waveform.shape[0] - 16000) < 2000
        if ext != "ogg":
            assert torch.allclose(b.waveform, a.waveform, atol=1e-4)
    assert not list(tmp_path.glob(".*.tmp")), "atomic save leaves no temp files"
    b = Audio(tmp_path / "out.wav", sample_rate=24000)
    assert b.sample_rate == 24000 and b.waveform.shape == (24000,)
    c = b.resample(8000)
    assert c.sample_rate == 8000 and c.waveform.shape == (8000,) and c.path == tmp_path / "out.wav"
    _expect(tmp_path / "x.mp3", lambda: a.save(tmp_path / "x.mp3"), "cannot save")


def test_windows_of_a_long_file_equal_the_full_load(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "minute.flac"
    sf.write(path, rng.uniform(-0.5, 0.5, (60 * 22050, 2)).astype(np.float32), 22050)  # 60 s stereo
    full, _ = load_audio(path, sample_rate=16000)
    windows = list(iter_audio_windows(path, window_s=7.0, sample_rate=16000))
    assert len(windows) == 9 and all(w.shape[0] == 7 * 16000 for w in windows[:-1])
    joined = torch.cat(windows)
    assert joined.shape == full.shape
    assert torch.allclose(joined, full, atol=1e-5)
    native = torch.cat(list(iter_audio_windows(path, window_s=13.0)))
    assert torch.equal(native, load_audio(path)[0])


def _wav_with_rate(path, rate: int, frames: int = 800):
    """A small 8 kHz wav whose header is then patched to claim ``rate`` (a corrupt or odd header)."""
    import struct

    sf.write(path, tone(sr=8000, seconds=frames / 8000), 8000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"fmt "
    data[24:32] = struct.pack("<II", rate, rate * 2)  # sample rate, byte rate (mono 16-bit)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("rate", [1, 999, 384_001, 9_999_991])
def test_sample_rates_outside_1k_384k_are_refused(tmp_path, rate):
    path = _wav_with_rate(tmp_path / f"r{rate}.wav", rate)
    _expect(path, lambda: load_audio(path, sample_rate=16000), f"sample rate {rate} Hz", "1000-384000")
    _expect(path, lambda: next(iter_audio_windows(path, 1.0, 16000)), f"sample rate {rate} Hz")
    _expect(path, lambda: Audio(path).waveform, f"sample rate {rate} Hz")
    _expect("Tensor", lambda: Audio(torch.zeros(100), sample_rate=rate), f"sample rate {rate} Hz")
    good = _wav_with_rate(tmp_path / "good.wav", 8000)
    _expect(good, lambda: load_audio(good, sample_rate=rate), f"sample rate {rate} Hz")  # asking for it too


def test_awkward_rate_ratio_resamples_in_bounded_memory(tmp_path, monkeypatch):
    """44101 -> 16000 Hz: torchaudio's kernel would be 16000 x 44135 floats (2.8 GB); the file loads
    (and windows) through the per-sample filter, the same filter torchaudio uses."""
    import torchaudio.functional as AF

    from omni.media import audio

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4411)))  # float64: exact comparison
    assert torch.allclose(audio._sinc_resample(x, 4411, 1600), AF.resample(x, 4411, 1600), atol=1e-9)
    assert torch.allclose(audio._sinc_resample(x, 22050, 16000), AF.resample(x, 22050, 16000), atol=1e-9)

    path = tmp_path / "odd.wav"
    sf.write(path, tone(freq=1000.0, sr=44101, seconds=2.0), 44101, subtype="FLOAT")
    monkeypatch.setattr(AF, "resample", lambda *a, **kw: pytest.fail("torchaudio built its kernel (2.8 GB)"))
    wave, sr = load_audio(path, sample_rate=16000)
    assert sr == 16000 and wave.shape == (math.ceil(2 * 44101 * 16000 / 44101),)
    assert abs(peak_hz(wave, 16000) - 1000) < 2 and abs(wave.abs().max().item() - 0.5) < 0.01
    windows = list(iter_audio_windows(path, window_s=0.7, sample_rate=16000))
    assert torch.allclose(torch.cat(windows), wave, atol=1e-5)


@pytest.mark.parametrize("rate", [22050, 44100, 48000, 24000, 8000])
def test_usual_rates_resample_exactly_as_torchaudio(rate):
    import torchaudio.functional as AF

    from omni.media.audio import resample

    x = torch.from_numpy(tone(sr=rate, seconds=0.5))
    assert torch.equal(resample(x, rate, 16000), AF.resample(x, rate, 16000))


def test_max_seconds_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    from omni.media import audio

    path = tmp_path / "three.flac"
    sf.write(path, tone(sr=8000, seconds=3.0), 8000)
    monkeypatch.setattr(sf, "read", lambda *a, **kw: pytest.fail("decoded a file over the limit"))
    _expect(path, lambda: load_audio(path, max_seconds=2.0), "3 s long", "2 s limit",
            "OMNI_MAX_AUDIO_SECONDS")
    monkeypatch.setenv("OMNI_MAX_AUDIO_SECONDS", "2.5")
    _expect(path, lambda: Audio(path).waveform, "over the 2.5 s limit")
    monkeypatch.setenv("OMNI_MAX_AUDIO_SECONDS", "lots")
    with pytest.raises(ValueError, match="OMNI_MAX_AUDIO_SECONDS='lots'"):
        load_audio(path)
    monkeypatch.delenv("OMNI_MAX_AUDIO_SECONDS")
    assert audio.MAX_SECONDS == 7200
    monkeypatch.setattr(audio, "MAX_SECONDS", 1.0)
    _expect(path, lambda: load_audio(path), "over the 1 s limit")
    m4a = tmp_path / "three.m4a"  # the PyAV path: the container's duration
    write_pyav(m4a, tone(sr=16000, seconds=3.0), 16000)
    _expect(m4a, lambda: load_audio(m4a, max_seconds=2.0), "2 s limit")
    monkeypatch.undo()
    assert load_audio(path, max_seconds=3.5)[0].shape == (24000,)
    assert load_audio(m4a, max_seconds=3.5)[1] == 16000


def test_zero_channel_tensor_is_an_error_not_nan():
    _expect("(0, 100)", lambda: Audio(torch.zeros(0, 100), sample_rate=16000), "no audio channels")
    _expect("(2, 0)", lambda: Audio(torch.zeros(2, 0), sample_rate=16000))
