"""Videos: sample frames with decord (PyAV as the fallback reader), read the audio track, write mp4.

``Video(path, num_frames=8)`` or ``Video(path, fps=2, max_frames=32)`` decodes on first use. Frame
sampling (one rule, both backends):

- The window is ``[start, end)`` in seconds (default: the whole video), measured from the first
  frame. ``start`` at or past the end, ``end <= start``, a negative ``start`` or an ``end`` past the
  end of the video is a :class:`~omni.media.MediaError`.
- Uniform (``fps=None``): ``num_frames`` (default 8) evenly spaced frames from the first to the
  last frame of the window (``linspace(0, n - 1, num_frames)``, as VideoLLaMA and Qwen2-VL sample).
  Ties are rounded toward the window's centre, so the chosen set is symmetric: the same video
  reversed gives the same frames in reverse order (the moving-stamp corpus relies on this:
  otherwise the set of positions alone could tell the direction).
- fps-based (``fps=2.0``): ``round(window seconds * fps)`` frames (at least 1), capped at
  ``max_frames`` (and at ``num_frames`` when that is given too), spaced the same way; so the rate
  is about ``fps`` unless a cap bites (then the frames still span the whole window, as in
  qwen-vl-utils). ``max_frames`` caps uniform sampling as well.
- **More frames asked than the window has**: every frame in the window is returned, once, in
  order, so ``frames`` has fewer than ``num_frames`` rows. Frames are never duplicated: a
  duplicate would fake a frame rate the video lacks. ``len(video.frames)`` is the truth.

``effective_fps`` is the rate the sampled frames really have (frames over the window's seconds),
logged at debug level for each clip as it is decoded (``native_fps`` is the file's own rate).
``timestamps`` are the sampled frames' presentation times in seconds from the first frame.
``audio`` is the audio track over the same window as a mono float32 waveform (``None`` when the
file has no audio stream), read with PyAV whatever the frame backend.

Limits, checked from the stream's metadata before any frame is decoded (a corrupt header or a
mistaken ``fps`` must not fill the memory): frames wider or taller than :data:`MAX_FRAME_SIDE`
(8192 px; 8K UHD is 7680 x 4320) and sampling more than :data:`MAX_FRAMES` frames (768, qwen-vl-utils'
cap for fps sampling) raise :class:`~omni.media.MediaError`. Both are module constants, read at
each load, to change for the whole process.

``backend="auto"`` uses decord when it is installed and can read the file, else PyAV; both give
the same frames for the same file (tested). decord 0.6 fails on some frame widths (16 and 48 px
among those tried: a buffer-size check in its copy); ``auto`` then falls back to PyAV.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from omni.io import default_mode
from omni.media.base import MediaError
from omni.media.image import describe

log = logging.getLogger(__name__)

BACKENDS = ("auto", "decord", "pyav")
DECORD_INSTALL = "pip install decord"
PYAV_INSTALL = "pip install av"
MAX_FRAME_SIDE = 8192  # pixels, width and height each
MAX_FRAMES = 768  # frames sampled from one video
DEFAULT_NUM_FRAMES = 8  # uniform sampling when neither num_frames nor fps is given


class AudioTrack(NamedTuple):
    waveform: torch.Tensor  # float32 (T,), mono, in [-1, 1]
    sample_rate: int


class _Decoded(NamedTuple):
    frames: torch.Tensor  # uint8 (N, 3, H, W)
    timestamps: torch.Tensor  # float64 (N,)
    duration: float
    native_fps: float
    num_source_frames: int


class Video:
    """Frames sampled from a video file.

    frames: uint8 ``(N, 3, H, W)`` RGB; timestamps: float64 ``(N,)`` seconds; duration (s);
    native_fps; num_source_frames (frames in the whole file); backend (the one that decoded);
    audio: :class:`AudioTrack` or ``None``.
    """

    def __init__(self, path: str | Path, num_frames: int | None = None, fps: float | None = None,
                 start: float | None = None, end: float | None = None, backend: str = "auto",
                 max_frames: int | None = None):
        self.path = Path(path)
        if num_frames is None and fps is None:
            num_frames = DEFAULT_NUM_FRAMES
        self.num_frames, self.fps, self.start, self.end = num_frames, fps, start, end
        self.max_frames = max_frames
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        for key, value in (("num_frames", num_frames), ("max_frames", max_frames)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MediaError(self.path, f"{key} must be a positive integer, got {value!r}")
        if fps is not None and not fps > 0:
            raise MediaError(self.path, f"fps must be > 0, got {fps!r}")
        if start is not None and start < 0:
            raise MediaError(self.path, f"bad start/end: start={start} s is negative")
        if start is not None and end is not None and end <= start:
            raise MediaError(self.path, f"bad start/end: end={end} s must be after start={start} s")
        self.requested_backend = backend
        self.backend: str | None = None
        self._decoded: _Decoded | None = None
        self._audio: AudioTrack | bool | None = False  # False: not read yet

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in (("max_frames", self.max_frames), ("start", self.start),
                                                  ("end", self.end)) if v is not None)
        return f"Video({str(self.path)!r}, num_frames={self.num_frames}, fps={self.fps}{extra})"

    @classmethod
    def from_frames(cls, frames: torch.Tensor, fps: float = 1.0, name: str = "<frames>") -> Video:
        """A video of frames already decoded, uint8 ``(N, 3, H, W)`` taken ``fps`` apart (a
        client's list of images), with no audio track."""
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3 or not len(frames):
            raise MediaError(name, f"expected uint8 frames (N, 3, H, W), got {describe(frames)}")
        out = cls(name, num_frames=len(frames), fps=fps)
        n = len(frames)
        out._decoded = _Decoded(frames, torch.arange(n, dtype=torch.float64) / fps, n / fps, fps, n)
        out._audio = None
        return out

    @property
    def frames(self) -> torch.Tensor:
        return self._load().frames

    def reversed(self) -> Video:
        """The same frames played backwards (timestamps still run forwards), without the audio
        track: a model that reads the order of the frames should describe the opposite motion."""
        out = copy.copy(self)
        decoded = self._load()
        out._decoded, out._audio = decoded._replace(frames=decoded.frames.flip(0)), None
        return out

    @property
    def timestamps(self) -> torch.Tensor:
        return self._load().timestamps

    @property
    def duration(self) -> float:
        return self._load().duration

    @property
    def native_fps(self) -> float:
        return self._load().native_fps

    @property
    def num_source_frames(self) -> int:
        return self._load().num_source_frames

    @property
    def effective_fps(self) -> float:
        """Frames per second of the sampled frames over the window they were taken from."""
        decoded = self._load()
        return len(decoded.timestamps) / _window_seconds(decoded.duration, self.start, self.end)

    @property
    def audio(self) -> AudioTrack | None:
        if self._audio is False:
            self._check_file()
            # Cut to the frames' window; AAC pads the track to whole 1024-sample packets.
            end = self.end if self.end is not None else self.duration
            self._audio = read_audio(self.path, start=self.start, end=end)
        return self._audio

    def _check_file(self) -> None:
        if not self.path.is_file():
            raise MediaError(self.path, "file not found" if not self.path.exists() else "not a regular file")
        if self.path.stat().st_size == 0:
            raise MediaError(self.path, "empty file (0 bytes)")

    def _load(self) -> _Decoded:
        if self._decoded is not None:
            return self._decoded
        self._check_file()
        _check_frame_size(self.path)
        backend = self.requested_backend
        if backend == "auto":
            try:
                import_decord()
                backend = "decord"
            except ImportError:
                backend = "pyav"
        if backend == "decord":
            try:
                self._decoded = _read_decord(self)
            except MediaError as e:
                if self.requested_backend == "decord" or e.problem.startswith("bad start/end"):
                    raise
                log.info("%s: decord failed (%s); trying PyAV", self.path, e.problem)
                backend = "pyav"
        if backend == "pyav":
            self._decoded = _read_pyav(self)
        self.backend = backend
        d = self._decoded
        log.debug("%s: %d frames over %.2f s: %.2f fps effective (file: %.2f fps, %d frames; %s)", self.path,
                  len(d.timestamps), _window_seconds(d.duration, self.start, self.end), self.effective_fps,
                  d.native_fps, d.num_source_frames, backend)
        return self._decoded


def _window_seconds(duration: float, start: float | None, end: float | None) -> float:
    return max(min(duration, duration if end is None else end) - (start or 0.0), 1e-9)


def sample_indices(timestamps: np.ndarray, duration: float, num_frames: int | None, fps: float | None,
                   start: float | None, end: float | None, name, max_frames: int | None = None) -> np.ndarray:
    """Indices of the frames to take, by the module docstring's rule. timestamps: (n,) seconds, sorted."""
    n = len(timestamps)
    if n == 0:
        raise MediaError(name, "the video has no frames")
    t0 = 0.0 if start is None else float(start)
    t1 = duration if end is None else float(end)
    half_frame = 0.5 * duration / n
    if t0 >= duration:
        raise MediaError(name, f"bad start/end: start={t0:g} s is at or past the end of the video "
                               f"({duration:g} s)")
    if t1 > duration + half_frame:
        raise MediaError(name, f"bad start/end: end={t1:g} s is past the end of the video ({duration:g} s)")
    window = np.flatnonzero((timestamps >= t0 - 1e-6) & (timestamps < t1 - 1e-6))
    if len(window) == 0:
        raise MediaError(name, f"bad start/end: no frame starts within [{t0:g}, {t1:g}) s")
    want = num_frames if num_frames is not None else math.inf
    if fps is not None:
        want = min(want, max(1, round((t1 - t0) * fps)))
    if max_frames is not None:
        want = min(want, max_frames)
    if min(want, len(window)) > MAX_FRAMES:
        raise MediaError(name, f"would sample {min(want, len(window))} frames, "
                               f"over the limit of {MAX_FRAMES} "
                               "(omni.media.video.MAX_FRAMES); lower fps or num_frames, or cut start/end")
    if want >= len(window):
        return window  # every frame once: never duplicate (see the module docstring)
    pos = np.linspace(0, len(window) - 1, int(want))
    centre = (len(window) - 1) / 2
    pick = np.where(pos <= centre, np.floor(pos + 0.5), np.ceil(pos - 0.5)).astype(np.int64)  # ties to centre
    return window[pick]


def _check_frame_size(path: Path) -> None:
    """Refuse frames wider or taller than :data:`MAX_FRAME_SIDE` from the stream header, before
    either backend decodes one. A file PyAV cannot open is left to the backends to report."""
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return
            ctx = container.streams.video[0].codec_context
            width, height = ctx.width, ctx.height
    except (av.error.FFmpegError, OSError, ValueError):
        return
    if max(width, height) > MAX_FRAME_SIDE:
        raise MediaError(path, f"frames of {width}x{height} pixels are over the limit of {MAX_FRAME_SIDE} "
                               "per side (omni.media.video.MAX_FRAME_SIDE)")


@functools.cache  # once a process: every video opened asks for it (backend choice, then decoding)
def import_decord():
    """The decord module, imported after the system zlib is loaded into the global symbol scope.
    decord loads its library with ``RTLD_GLOBAL``, and with it a bundled zlib 1.2.3; every library
    loaded after it (Pillow's libpng, which FreeType's colour-emoji glyphs decode through) would
    otherwise bind to that zlib and fail ("OSError: broken file" drawing an emoji)."""
    import ctypes

    try:
        ctypes.CDLL("libz.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass  # no system zlib under that name: nothing to put first
    import decord

    return decord


def _read_decord(v: Video) -> _Decoded:
    try:
        decord = import_decord()
    except ImportError:
        raise MediaError(v.path, f"the decord backend needs decord: {DECORD_INSTALL} "
                                 f"(or use backend='pyav')") from None
    try:
        vr = decord.VideoReader(str(v.path), ctx=decord.cpu(0))
        n = len(vr)
        native_fps = float(vr.get_avg_fps())
        ts = vr.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64) if n else np.zeros(0)
    except MediaError:
        raise
    except Exception as e:  # decord raises DECORDError / RuntimeError with C++ log text
        raise MediaError(v.path, f"cannot open as video: corrupt or truncated file ({_first_line(e)})") \
            from None
    if n == 0:
        raise MediaError(v.path, "the video has no frames")
    ts = ts - ts[0]
    duration = _duration(ts, native_fps)
    idx = sample_indices(ts, duration, v.num_frames, v.fps, v.start, v.end, v.path, v.max_frames)
    try:
        batch = vr.get_batch(idx.tolist()).asnumpy()  # (N, H, W, 3) uint8
    except Exception as e:
        raise MediaError(v.path, f"truncated or corrupt video data ({_first_line(e)})") from None
    frames = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    return _Decoded(frames, torch.from_numpy(ts[idx].copy()), duration, native_fps, n)


def _read_pyav(v: Video) -> _Decoded:
    av = _import_av()
    try:
        with av.open(str(v.path)) as container:
            if not container.streams.video:
                raise MediaError(v.path, "no video stream (an mp4 whose video track has no frames also "
                                         "looks like this)")
            stream = container.streams.video[0]
            # Pass 1: demux only (no decoding) to learn every frame's presentation time.
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0)
            if not pts:
                raise MediaError(v.path, "the video has no frames")
            tb = float(stream.time_base)
            rate = stream.average_rate or stream.guessed_rate
            ts = (np.asarray(pts, dtype=np.float64) - pts[0]) * tb
            native_fps = float(rate) if rate else (len(ts) - 1) / max(ts[-1], 1e-9)
            duration = _duration(ts, native_fps)
            idx = sample_indices(ts, duration, v.num_frames, v.fps, v.start, v.end, v.path, v.max_frames)
            # Pass 2: decode from the start in presentation order, keeping the wanted frames.
            container.seek(0)
            stream.thread_type = "AUTO"
            wanted, out, i = set(idx.tolist()), {}, 0
            for frame in container.decode(stream):
                if i in wanted:
                    out[i] = frame.to_ndarray(format="rgb24")
                    if len(out) == len(wanted):
                        break
                i += 1
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(v.path, f"cannot decode video: corrupt or truncated file ({_first_line(e)})") \
            from None
    if len(out) < len(idx):
        raise MediaError(v.path, f"truncated or corrupt video data: decoded {i} frames, the container "
                                 f"lists {len(ts)}")
    frames = torch.from_numpy(np.stack([out[j] for j in idx.tolist()])).permute(0, 3, 1, 2).contiguous()
    return _Decoded(frames, torch.from_numpy(ts[idx].copy()), duration, native_fps, len(ts))


def _duration(ts: np.ndarray, native_fps: float) -> float:
    """Seconds from the first frame to the end of the last one (the last frame lasts 1/fps)."""
    return float(ts[-1] + (1.0 / native_fps if native_fps > 0 else 0.0))


def _first_line(e: Exception) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError(f"reading and writing video with PyAV needs av: {PYAV_INSTALL}") from None
    return av


def read_audio(path: str | Path, start: float | None = None, end: float | None = None,
               sample_rate: int | None = None) -> AudioTrack | None:
    """The first audio stream of any file FFmpeg reads (mp4, ogg, wav, ...) as mono float32.

    Channels are averaged; ``sample_rate`` resamples (default: the stream's rate). ``start`` /
    ``end`` (seconds) cut the waveform. Returns ``None`` when the file has no audio stream.
    """
    av = _import_av()
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            rate = int(sample_rate or stream.rate)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = []
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler count samples; some streams carry gaps
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(path, f"cannot decode audio ({_first_line(e)})") from None
    wav = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    a = 0 if start is None else round(start * rate)
    b = len(wav) if end is None else round(end * rate)
    return AudioTrack(torch.from_numpy(wav[a:b].copy()), rate)


def write_video(path: str | Path, frames: torch.Tensor, fps: float, audio: torch.Tensor | None = None,
                sample_rate: int | None = None, crf: int = 18) -> Path:
    """Write uint8 ``frames (N, 3, H, W)`` as an H.264/yuv420p mp4, with an AAC track when ``audio``
    (float ``(T,)`` mono or ``(C, T)``, in [-1, 1]) is given. Atomic: a temp file beside ``path``
    is renamed into place, so readers never see half a video. H and W must be even (yuv420p)."""
    av = _import_av()
    path = Path(path)
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 \
            or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"{path}: frames must be a non-empty uint8 tensor (N, 3, H, W), "
                         f"got {describe(frames)}")
    _n, _, h, w = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs even height and width, got {h}x{w}")
    if not fps > 0:
        raise ValueError(f"{path}: fps must be > 0, got {fps}")
    if audio is not None:
        if sample_rate is None or sample_rate <= 0:
            raise ValueError(f"{path}: audio needs a positive sample_rate")
        audio = audio.detach().float().cpu()
        if audio.dim() == 1:
            audio = audio[None]
        if audio.dim() != 2 or audio.shape[0] not in (1, 2) or audio.shape[1] == 0:
            raise ValueError(f"{path}: audio must be (T,) or (C, T) with C in 1, 2; got {tuple(audio.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.mp4")
    os.fchmod(fd, default_mode())
    os.close(fd)
    try:
        with av.open(tmp, "w", format="mp4") as container:
            vs = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(100000))
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            vs.options = {"crf": str(crf), "preset": "veryfast"}
            vs.thread_count = 1  # tiny clips gain nothing from threads on a shared machine
            if audio is not None:
                aus = container.add_stream("aac", rate=int(sample_rate))
                aus.layout = "mono" if audio.shape[0] == 1 else "stereo"
            for i, arr in enumerate(frames.permute(0, 2, 3, 1).numpy()):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
                frame.pts = i
                container.mux(vs.encode(frame))
            container.mux(vs.encode(None))
            if audio is not None:
                data = np.ascontiguousarray(audio.clamp(-1, 1).numpy())
                frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=aus.layout.name)
                frame.sample_rate, frame.pts = int(sample_rate), 0
                container.mux(aus.encode(frame))
                container.mux(aus.encode(None))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
