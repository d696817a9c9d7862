"""Audio files and tensors as mono float32 waveforms, with errors that name the file and the problem.

``load_audio`` decodes wav/flac/ogg/mp3 through soundfile (libsndfile) and falls back to PyAV
(FFmpeg) for what libsndfile cannot read (m4a/aac, mp4 audio tracks, exotic wav codecs). Channels
are averaged to mono and the rate is changed with ``torchaudio.functional.resample``.
``iter_audio_windows`` streams long files (an hour of speech) in fixed windows without decoding
the whole file. ``Audio`` is the media object of the public API: it decodes on first use.

Every failure is a :class:`omni.media.MediaError`. Choices for edge cases: silence loads as
zeros; a 1-sample file loads as a 1-sample waveform; NaN/inf samples, empty files and files
whose header promises more audio than is present (truncated) are errors.

Limits, checked from the header before anything is decoded:

- **Sample rate** within :data:`MIN_SAMPLE_RATE` - :data:`MAX_SAMPLE_RATE` (1 kHz - 384 kHz), for
  files, windows and tensors alike; a rate outside it is a corrupt header (or a mistake).
- **Duration**: ``load_audio`` (and so ``Audio(path)``) refuses a file longer than
  ``max_seconds``, by default the environment variable ``OMNI_MAX_AUDIO_SECONDS`` when set, else
  :data:`MAX_SECONDS` (2 hours; 2 h of 48 kHz stereo decodes to 2.8 GB of float32). Pass
  ``load_audio(path, max_seconds=...)``, set the variable (``inf`` lifts the limit) or the module
  constant. ``iter_audio_windows`` streams what libsndfile reads, so that has no duration limit.

``resample`` never needs much more memory than the clip: rate pairs whose reduced ratio is
awkward (44101 -> 16000 Hz would make torchaudio build a 16000 x 44135 kernel, 2.8 GB) use the
same filter evaluated per output sample, in chunks (see :func:`resample`).
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from omni.io import atomic_write_bytes
from omni.media.base import MediaError

SAVE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
_MIN_FRACTION_PRESENT = 0.9  # decoded / declared frames below this means the file was cut short
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000
MAX_SECONDS = 2 * 3600.0  # the default longest file load_audio decodes whole (see the module docstring)
MAX_SECONDS_ENV = "OMNI_MAX_AUDIO_SECONDS"


# ---------------------------------------------------------------------------------------------
# Decoding


def load_audio(path: str | Path, sample_rate: int | None = None, mono: bool = True,
               max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """Decode an audio file.

    Returns ``(wave, sr)``: ``wave`` is float32 ``(T,)`` when ``mono`` (channels averaged), else
    ``(C, T)``; ``sr`` is ``sample_rate`` when given (the audio is resampled), else the file's rate.
    A file longer than ``max_seconds`` (default: :func:`max_seconds_default`) or with a sample rate
    outside 1-384 kHz is refused from its header, before decoding.
    """
    path = _check_file(path)
    limit = max_seconds_default() if max_seconds is None else max_seconds
    try:
        import soundfile as sf

        declared = sf.info(str(path))
        _check_header(path, declared.samplerate, declared.frames, limit)
        if path.suffix.lower() == ".wav":
            _check_wav_size(path)
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # data: (T, C)
        wave = torch.from_numpy(np.ascontiguousarray(data.T))  # (C, T)
        _check_complete(path, wave.shape[-1], declared.frames)
    except MediaError:
        raise
    except Exception as sf_error:  # libsndfile cannot read it: try FFmpeg, report both if that fails too
        wave, sr = _load_pyav(path, sf_error, limit)
    return _finish(wave, sr, path, sample_rate, mono)


def max_seconds_default() -> float:
    """The longest file ``load_audio`` decodes whole: ``$OMNI_MAX_AUDIO_SECONDS`` when set, else
    :data:`MAX_SECONDS`. Read at each call, so either can be changed at run time."""
    value = os.environ.get(MAX_SECONDS_ENV)
    if value is None:
        return MAX_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise ValueError(f"{MAX_SECONDS_ENV}={value!r}: expected a number of seconds > 0 (or inf)")
    return seconds


def _check_rate(source, sr) -> None:
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise MediaError(source, f"sample rate {sr} Hz is outside the supported {MIN_SAMPLE_RATE}-"
                                 f"{MAX_SAMPLE_RATE} Hz")


def _check_header(source, sr: int, frames: float | None, max_seconds: float) -> None:
    """The rate and the declared length, before any sample is decoded."""
    _check_rate(source, sr)
    if frames and frames / sr > max_seconds:
        raise MediaError(source, f"{frames / sr:.0f} s long, over the {max_seconds:g} s limit (pass "
                                 f"max_seconds=... or set {MAX_SECONDS_ENV})")


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "file not found")
    if not path.is_file():
        raise MediaError(path, "not a regular file (a directory?)")
    if path.stat().st_size == 0:
        raise MediaError(path, "file is empty (0 bytes)")
    return path


def _check_complete(path: Path, num_frames: int, declared: int | float | None):
    if declared and num_frames < _MIN_FRACTION_PRESENT * declared:
        raise MediaError(path, f"truncated: the header declares {int(declared)} frames but only {num_frames} "
                               "could be decoded")


def _check_wav_size(path: Path):
    """libsndfile silently shortens a truncated RIFF/WAVE file; compare the data chunk's declared size
    with the bytes actually present."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # RF64, W64, ...: trust libsndfile
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                present = path.stat().st_size - f.tell()
                if size not in (0, 0xFFFFFFFF) and present < size:  # 0 / -1: size unknown (streamed wav)
                    raise MediaError(path, f"truncated: the WAV header declares {size} bytes of samples "
                                           f"but only {present} are present")
                return
            f.seek(size + (size & 1), 1)


def _load_pyav(path: Path, sf_error: Exception, max_seconds: float) -> tuple[torch.Tensor, int]:
    try:
        import av
    except ImportError:
        raise MediaError(path, f"not readable by soundfile ({sf_error}); install PyAV for other formats: "
                               "pip install av") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(path, "no audio stream in the file")
            stream = container.streams.audio[0]
            sr = stream.codec_context.sample_rate or stream.rate
            declared = container.duration * sr / 1e6 if container.duration else None
            _check_header(path, sr, declared, max_seconds)
            resampler = av.AudioResampler(format="fltp")  # planar float32, layout and rate kept
            chunks, decoded = [], 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())  # (C, n)
                    decoded += chunks[-1].shape[-1]
                _check_header(path, sr, decoded, max_seconds)  # the container may not declare a duration
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    except MediaError:
        raise
    except Exception as av_error:
        raise MediaError(path, f"not a readable audio file (soundfile: {sf_error}; "
                               f"FFmpeg: {av_error})") from None
    if not chunks:
        raise MediaError(path, "the audio stream holds no samples")
    wave = torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32))
    _check_complete(path, wave.shape[-1], declared)
    return wave, int(sr)


def _finish(wave: torch.Tensor, sr: int, source, sample_rate: int | None,
            mono: bool) -> tuple[torch.Tensor, int]:
    """Shared checks and conversions for files and tensors. wave: (C, T) float32."""
    _check_rate(source, sr)
    if wave.shape[-1] == 0:
        raise MediaError(source, "no audio samples (0 frames)")
    if wave.shape[0] == 0:
        raise MediaError(source, "no audio channels (shape (0, T))")
    if not torch.isfinite(wave).all():
        raise MediaError(source, "contains NaN or infinite samples")
    if mono:
        wave = wave.mean(dim=0)
    if sample_rate is not None:
        _check_rate(source, sample_rate)
        wave = resample(wave, sr, sample_rate)
        sr = sample_rate
    return wave.contiguous(), int(sr)


_LOWPASS_WIDTH, _ROLLOFF = 6, 0.99  # torchaudio.functional.resample's defaults (sinc_interp_hann)
_MAX_KERNEL = 1 << 20  # torchaudio kernel elements above which resample() evaluates the filter per sample
_CHUNK = 1 << 18  # output samples x taps evaluated at a time by _sinc_resample


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Change the sample rate of ``wave: (..., T)`` (band-limited sinc interpolation, torchaudio's).

    torchaudio builds one filter per output phase: ``new/g x (orig/g + taps)`` values for
    ``g = gcd(orig, new)``. That is small for the usual rates (22050, 44100, 48000 -> 16000: at most
    150 k values) but 706 M (2.8 GB) for 44101 -> 16000. Above :data:`_MAX_KERNEL` values the same
    filter is evaluated at each output sample's own offset instead (:func:`_sinc_resample`), so
    memory stays a small multiple of the clip whatever the rates.
    """
    if orig_sr == new_sr:
        return wave
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be > 0, got {orig_sr} -> {new_sr}")
    orig, new = int(orig_sr), int(new_sr)
    g = math.gcd(orig, new)
    if new // g * (orig // g + 2 * _half_width(orig, new)) > _MAX_KERNEL:
        return _sinc_resample(wave, orig, new)
    import torchaudio.functional as AF

    return AF.resample(wave, orig, new)


def _half_width(orig: int, new: int) -> int:
    """Input samples on each side of an output sample that the resampling filter reads (torchaudio's
    ``width``)."""
    return math.ceil(_LOWPASS_WIDTH * orig / (min(orig, new) * _ROLLOFF))


def _sinc_resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """torchaudio's resampling filter (Hann-windowed sinc, ``lowpass_filter_width=6``,
    ``rolloff=0.99``) evaluated per output sample: output ``m`` sums input ``s`` weighted by
    ``h((s/orig - m/new) * base)``, ``base = 0.99 * min(orig, new)``. The same output as
    ``torchaudio.functional.resample`` (to float rounding) for any rates, costing
    ``_CHUNK`` weights of scratch memory instead of one filter per phase."""
    shape = wave.shape
    x = wave.reshape(-1, shape[-1])
    length = x.shape[-1]
    out_len = -(-new * length // orig)  # ceil, as torchaudio
    base = min(orig, new) * _ROLLOFF
    half = _half_width(orig, new)
    taps = torch.arange(-half, half + 2)
    # zeros beyond the ends, as torchaudio; row c of `frames` is input samples c - half ... c + half + 1
    frames = torch.nn.functional.pad(x, (half, half + 2)).unfold(-1, len(taps), 1)
    out = x.new_empty(x.shape[0], out_len)
    step = max(1, _CHUNK // len(taps))
    for lo in range(0, out_len, step):
        m = torch.arange(lo, min(lo + step, out_len))
        c = m * orig // new  # the input sample at or before output m
        # (s/orig - m/new) * orig * new for s = c + taps: integers below 2**24 for rates up to
        # MAX_SAMPLE_RATE, so float32 holds them exactly and t is accurate to float32 rounding
        t = (c * new - m * orig).to(x.dtype)[:, None] + (taps * new).to(x.dtype)
        t = (t * (base / (orig * new))).clamp(-_LOWPASS_WIDTH, _LOWPASS_WIDTH)
        window = torch.cos(t * (math.pi / _LOWPASS_WIDTH / 2)) ** 2
        t = t * math.pi
        kernel = torch.where(t == 0, 1.0, torch.sin(t) / t) * window * (base / orig)
        out[:, lo:lo + len(m)] = (frames[:, c] * kernel).sum(-1)
    return out.reshape(*shape[:-1], out_len)


def iter_audio_windows(path: str | Path, window_s: float,
                       sample_rate: int | None = None) -> Iterator[torch.Tensor]:
    """Yield consecutive mono windows of ``window_s`` seconds (the last one shorter) of a long file.

    Files libsndfile can seek (wav, flac, ogg, mp3) are streamed: only one window plus a little
    context is in memory, so an hour-long recording costs no more than one window. Each window is
    resampled with ``margin`` native samples of context on both sides and the margins are trimmed,
    so the concatenated windows equal ``load_audio(path, sample_rate)`` up to float rounding.
    Other formats are decoded whole (PyAV, under ``load_audio``'s duration limit) and then cut.
    The file's rate and ``sample_rate`` must be within 1-384 kHz; a streamed file has no duration
    limit (memory is one window whatever the length).
    """
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    path = _check_file(path)
    import soundfile as sf

    if path.suffix.lower() == ".wav":
        _check_wav_size(path)
    try:
        f = sf.SoundFile(str(path))
    except Exception:
        wave, sr = load_audio(path, sample_rate)
        step = max(1, round(window_s * sr))
        for start in range(0, wave.shape[0], step):
            yield wave[start:start + step]
        return
    with f:
        orig, total = f.samplerate, f.frames
        new = sample_rate or orig
        _check_rate(path, orig)
        _check_rate(path, new)
        # A native window a multiple of ``unit`` samples maps to a whole number of output samples,
        # so window boundaries fall on the same output samples as in a full-file resample.
        unit = orig // math.gcd(orig, new)
        window = max(1, round(window_s * orig / unit)) * unit
        # the filter's reach
        margin = 0 if new == orig else unit * math.ceil((_half_width(orig, new) + 2) / unit)
        for start in range(0, total, window):
            lo, hi = max(0, start - margin), min(total, start + window + margin)
            f.seek(lo)
            block = f.read(hi - lo, dtype="float32", always_2d=True)  # (n, C)
            if len(block) < hi - lo:
                raise MediaError(path, f"truncated: could read only {lo + len(block)} of {total} frames")
            wave, _ = _finish(torch.from_numpy(np.ascontiguousarray(block.T)), orig, path, None, True)
            if new != orig:
                wave = resample(wave, orig, new)
                left = (start - lo) * new // orig
                length = math.ceil((min(start + window, total) - start) * new / orig)
                wave = wave[left:left + length]
            yield wave


# ---------------------------------------------------------------------------------------------
# The media object


class Audio:
    """A mono waveform from a file or a tensor, decoded on first use.

    ``Audio("speech.flac")`` or ``Audio("speech.flac", sample_rate=16000)`` (resampled on load);
    ``Audio(tensor_or_array, sample_rate=24000)`` with float samples ``(T,)`` or ``(C, T)``.
    ``.waveform`` is float32 ``(T,)``; ``.sample_rate``; ``.path`` (None for tensors);
    ``.duration`` in seconds; ``.resample(sr)``; ``.save(path)`` (wav / flac / ogg by suffix).
    """

    def __init__(self, source: str | Path | torch.Tensor | np.ndarray, sample_rate: int | None = None):
        self._wave: torch.Tensor | None = None
        self._sr = sample_rate
        if isinstance(source, (str, Path)):
            self.path: Path | None = Path(source)
            self._target_sr = sample_rate
        elif isinstance(source, (torch.Tensor, np.ndarray)):
            self.path = None
            self._wave, self._sr = self._from_tensor(source, sample_rate)
        else:
            raise MediaError(type(source).__name__,
                             "Audio takes a file path, a torch.Tensor or a numpy array")

    @classmethod
    def empty(cls, sample_rate: int) -> Audio:
        """A clip of no samples: what generation returns when the model ends the audio at once
        (a waveform passed in by a user must have samples)."""
        out = cls.__new__(cls)
        out.path, out._wave, out._sr = None, torch.zeros(0), int(sample_rate)
        return out

    @staticmethod
    def _from_tensor(x, sample_rate) -> tuple[torch.Tensor, int]:
        name = f"<{type(x).__name__} {tuple(x.shape)}>"
        if sample_rate is None:
            raise MediaError(name, "sample_rate is required for a tensor "
                                   "(e.g. Audio(wave, sample_rate=16000))")
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise MediaError(name, f"sample_rate must be a positive integer, got {sample_rate!r}")
        wave = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
        if not wave.is_floating_point():
            raise MediaError(name, f"dtype {wave.dtype} is not a float type: pass samples in [-1, 1] "
                                   "(e.g. int16 / 32768)")
        if wave.dim() not in (1, 2):
            raise MediaError(name, f"expected a waveform (T,) or (C, T), got {wave.dim()} dimensions")
        if wave.dim() == 2 and wave.shape[0] > wave.shape[1]:
            raise MediaError(name, f"shape {tuple(wave.shape)} looks like (T, C); pass channels first (C, T)")
        wave = wave.detach().to("cpu", torch.float32)
        return _finish(wave if wave.dim() == 2 else wave[None], sample_rate, name, None, True)

    def _decode(self):
        if self._wave is None:
            self._wave, self._sr = load_audio(self.path, self._target_sr)

    @property
    def waveform(self) -> torch.Tensor:
        """Mono float32 samples ``(T,)``."""
        self._decode()
        return self._wave

    @property
    def sample_rate(self) -> int:
        self._decode()
        return self._sr

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.waveform.shape[0] / self.sample_rate

    def resample(self, sample_rate: int) -> Audio:
        """A new ``Audio`` at ``sample_rate`` (same ``path``)."""
        out = Audio(resample(self.waveform, self.sample_rate, sample_rate), sample_rate)
        out.path = self.path
        return out

    def save(self, path: str | Path) -> Path:
        """Write the waveform atomically; the suffix picks the format: .wav (16-bit), .flac, .ogg (Vorbis)."""
        import soundfile as sf

        path = Path(path)
        if path.suffix.lower() not in SAVE_FORMATS:
            raise MediaError(path, f"cannot save audio as {path.suffix or 'no suffix'!r}; use one of "
                                   f"{', '.join(SAVE_FORMATS)}")
        fmt, subtype = SAVE_FORMATS[path.suffix.lower()]
        buf = io.BytesIO()
        sf.write(buf, self.waveform.clamp(-1, 1).numpy(), self.sample_rate, format=fmt, subtype=subtype)
        atomic_write_bytes(path, buf.getvalue())
        return path

    def __repr__(self) -> str:
        if self._wave is None:
            return f"Audio({str(self.path)!r}, not decoded yet)"
        src = str(self.path) if self.path else "tensor"
        return f"Audio({src!r}, {self._sr} Hz, {self.duration:.2f} s)"
