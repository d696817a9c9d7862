"""omni.media.video: frame sampling rules on both backends, audio track, bad files, write_video."""

import numpy as np
import pytest
import torch

from omni.media import MediaError
from omni.media.video import Video, read_audio, sample_indices, write_video

FPS, N, H, W, SR = 10, 20, 32, 64, 16000


def _frames(n=N, h=H, w=W):
    """Frame i is a flat colour whose red channel is 12 * i, so decoded frames tell their index."""
    f = torch.zeros(n, 3, h, w, dtype=torch.uint8)
    f[:, 0] = (torch.arange(n, dtype=torch.uint8) * 12)[:, None, None]
    f[:, 1] = 60
    return f


def _index_of(frames):
    return (frames[:, 0].float().mean((1, 2)) / 12).round().long().tolist()


TONE = 0.5 * torch.sin(torch.arange(2 * SR) * 2 * torch.pi * 220 / SR)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", _frames(), FPS, audio=TONE, sample_rate=SR)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_uniform_sampling_spans_the_clip(clip, backend):
    v = Video(clip, num_frames=5, backend=backend)
    assert v.frames.shape == (5, 3, H, W) and v.frames.dtype == torch.uint8
    assert _index_of(v.frames) == [0, 5, 10, 14, 19]  # linspace(0, 19, 5) = 0, 4.75, 9.5, 14.25, 19
    assert v.timestamps.dtype == torch.float64
    assert v.timestamps.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.4, 1.9], abs=1e-3)
    assert v.duration == pytest.approx(2.0, abs=1e-3) and v.native_fps == pytest.approx(FPS)
    assert v.num_source_frames == N and v.backend == backend


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_fps_sampling_and_window(clip, backend):
    v = Video(clip, num_frames=None, fps=2, backend=backend)  # 2 s x 2 fps = 4 frames
    assert _index_of(v.frames) == [0, 6, 13, 19]
    v = Video(clip, num_frames=3, fps=5, backend=backend)  # 10 wanted, capped at 3, still spanning the clip
    assert _index_of(v.frames) == [0, 10, 19]
    v = Video(clip, num_frames=2, start=0.5, end=1.5, backend=backend)  # frames 5..14
    assert _index_of(v.frames) == [5, 14]
    assert v.timestamps.tolist() == pytest.approx([0.5, 1.4], abs=1e-3)


def test_fps_with_max_frames_and_the_effective_rate(clip, caplog):
    v = Video(clip, fps=4, backend="pyav")  # no num_frames: fps alone decides, 2 s x 4 fps = 8 frames
    assert len(v.frames) == 8 and v.effective_fps == pytest.approx(4.0)
    v = Video(clip, fps=4, max_frames=5, backend="pyav")  # capped, still spanning the clip
    assert _index_of(v.frames) == [0, 5, 10, 14, 19] and v.effective_fps == pytest.approx(2.5)
    with caplog.at_level("DEBUG", logger="omni.media.video"):
        v = Video(clip, fps=2, start=1.0, backend="pyav")  # frames 10..19 over 1 s: 2 frames
        assert _index_of(v.frames) == [10, 19]
    assert v.timestamps.tolist() == pytest.approx([1.0, 1.9], abs=1e-3)  # true times, not k / fps
    assert "2 frames over 1.00 s: 2.00 fps effective (file: 10.00 fps" in caplog.text
    assert Video(clip).num_frames == 8 and "max_frames=5" in repr(Video(clip, fps=1, max_frames=5))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_more_frames_than_the_video_returns_each_frame_once(clip, backend):
    v = Video(clip, num_frames=50, backend=backend)
    assert _index_of(v.frames) == list(range(N))
    assert (v.timestamps.diff() > 0).all()


def test_backends_agree(clip):
    a, b = Video(clip, num_frames=7, backend="decord"), Video(clip, num_frames=7, backend="pyav")
    assert torch.equal(a.timestamps, b.timestamps) or torch.allclose(a.timestamps, b.timestamps, atol=1e-6)
    assert (a.frames.int() - b.frames.int()).abs().max() <= 2


def test_auto_falls_back_to_pyav_where_decord_fails(tmp_path):
    path = write_video(tmp_path / "w48.mp4", _frames(4, 32, 48), FPS)  # decord 0.6 cannot copy 48-px rows
    with pytest.raises(MediaError):
        _ = Video(path, num_frames=2, backend="decord").frames
    v = Video(path, num_frames=2)
    assert v.frames.shape == (2, 3, 32, 48) and v.backend == "pyav"


def test_audio_track_is_mono_and_cut_to_the_window(clip, tmp_path):
    a = Video(clip).audio
    assert a.sample_rate == SR and a.waveform.dtype == torch.float32
    assert a.waveform.shape == (2 * SR,)
    assert torch.corrcoef(torch.stack([a.waveform[100:-2000], TONE[100:-2000]]))[0, 1] > 0.99
    cut = Video(clip, start=0.5, end=1.0).audio
    assert cut.waveform.shape == (SR // 2,)
    assert read_audio(clip, sample_rate=8000).waveform.shape[0] == pytest.approx(2 * 8000, abs=600)
    silent = write_video(tmp_path / "silent.mp4", _frames(4), FPS)
    assert Video(silent).audio is None


@pytest.mark.parametrize("kw, problem", [
    (dict(start=2.5), r"start=2.5 s is at or past the end of the video \(2 s\)"),
    (dict(start=1.0, end=3.0), r"end=3 s is past the end"),
    (dict(start=1.0, end=0.5), r"end=0.5 s must be after start=1.0 s"),
    (dict(start=-1.0), "start=-1.0 s is negative"),
    (dict(num_frames=0), "num_frames must be a positive integer"),
    (dict(fps=2, max_frames=0), "max_frames must be a positive integer"),
    (dict(fps=0), "fps must be > 0"),
])
def test_bad_arguments(clip, kw, problem):
    with pytest.raises(MediaError, match=problem):
        _ = Video(clip, **kw).frames


def _zero_frame_avi(path):
    import av
    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        c.start_encoding()
    return path


def _audio_only_mp4(path):
    import av
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=SR)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, SR), np.float32), format="fltp", layout="mono")
        frame.sample_rate = SR
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


def _faststart_mp4(path):
    """An mp4 with its index (moov) before the data, so a truncated copy still lists every frame."""
    import av
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i in range(N):
            noise = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(noise, format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


@pytest.mark.parametrize("backend", ["auto", "pyav", "decord"])
@pytest.mark.parametrize("case, problem", [
    ("missing", "file not found"),
    ("empty", r"empty file \(0 bytes\)"),
    ("garbage", "cannot (open as|decode) video"),
    ("truncated", "corrupt or truncated file"),
    ("truncated_faststart", "truncated or corrupt video data|corrupt or truncated file"),
    ("zero_frames", "has no frames|cannot open as video"),
    ("audio_only", "no video stream|cannot open as video"),
])
def test_bad_files(clip, tmp_path, backend, case, problem):
    path = tmp_path / f"{case}.mp4"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    elif case == "truncated":
        data = clip.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "truncated_faststart":
        data = _faststart_mp4(tmp_path / "whole.mp4").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "zero_frames":
        path = _zero_frame_avi(tmp_path / "zero.avi")
    elif case == "audio_only":
        path = _audio_only_mp4(path)
    if backend == "auto" and case in ("zero_frames", "audio_only"):
        problem = problem.split("|")[0]  # auto falls back to PyAV, whose message is the clear one
    with pytest.raises(MediaError, match=problem) as e:
        _ = Video(path, num_frames=4, backend=backend).frames
    assert str(path) in str(e.value)


def test_reversed_plays_the_same_frames_backwards(clip):
    video = Video(clip, num_frames=5)
    back = video.reversed()
    assert torch.equal(back.frames, video.frames.flip(0)) and torch.equal(back.timestamps, video.timestamps)
    assert back.audio is None and back.path == video.path
    assert not torch.equal(video.frames, back.frames)  # the original keeps its order


def test_sample_indices_rule():
    ts = np.arange(10) / 10
    assert sample_indices(ts, 1.0, 2, None, None, None, "x").tolist() == [0, 9]
    assert sample_indices(ts, 1.0, 10, None, None, None, "x").tolist() == list(range(10))
    assert sample_indices(ts, 1.0, None, 100.0, None, None, "x").tolist() == list(range(10))
    with pytest.raises(MediaError, match="no frames"):
        sample_indices(np.zeros(0), 0.0, 2, None, None, None, "x")


@pytest.mark.parametrize("n, want", [(16, 8), (20, 4), (15, 5), (16, 3), (21, 6), (100, 7)])
def test_sampling_is_symmetric_under_time_reversal(n, want):
    """A reversed video gives the same frames reversed, so frame positions alone cannot tell time's direction
    (only a middle frame of an even-length window sampled at an odd count can break the tie)."""
    idx = sample_indices(np.arange(n) / 10, n / 10, want, None, None, None, "x")
    assert len(set(idx.tolist())) == want and idx[0] == 0 and idx[-1] == n - 1
    mirrored = sorted((n - 1 - idx).tolist())
    odd_middle = n % 2 == 0 and want % 2 == 1
    assert sum(a != b for a, b in zip(mirrored, idx.tolist())) <= (1 if odd_middle else 0)


def test_write_video_validates_and_is_atomic(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "odd.mp4", _frames(2, 31, 64), FPS)
    with pytest.raises(ValueError, match=r"uint8 tensor \(N, 3, H, W\)"):
        write_video(tmp_path / "f.mp4", _frames(2).float(), FPS)
    with pytest.raises(ValueError, match="needs a positive sample_rate"):
        write_video(tmp_path / "a.mp4", _frames(2), FPS, audio=TONE)
    with pytest.raises(ValueError, match="fps must be > 0"):
        write_video(tmp_path / "z.mp4", _frames(2), 0)
    out = write_video(tmp_path / "sub" / "ok.mp4", _frames(3), 7.5)
    assert Video(out, num_frames=8).native_fps == pytest.approx(7.5)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["ok.mp4"]  # no temp files left


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_frames_over_the_size_limit_are_refused_before_decoding(tmp_path, backend):
    from omni.media import video

    wide = write_video(tmp_path / "wide.mp4", torch.zeros(2, 3, 16, 8194, dtype=torch.uint8), FPS)
    with pytest.raises(MediaError, match=r"8194x16 pixels are over the limit of 8192") as e:
        _ = Video(wide, num_frames=2, backend=backend).frames
    assert str(wide) in str(e.value)
    assert video.MAX_FRAME_SIDE == 8192  # the default, a module constant


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_sampling_more_frames_than_the_limit_is_refused(clip, backend, monkeypatch):
    from omni.media import video

    assert len(Video(clip, num_frames=None, fps=FPS, backend=backend).frames) == N
    monkeypatch.setattr(video, "MAX_FRAMES", N - 1, raising=False)  # raising=False: fails on the behaviour
    with pytest.raises(MediaError, match=f"would sample {N} frames, over the limit of {N - 1}") as e:
        _ = Video(clip, num_frames=None, fps=FPS, backend=backend).frames
    assert str(clip) in str(e.value)
    assert len(Video(clip, num_frames=N - 1, backend=backend).frames) == N - 1
    monkeypatch.undo()
    assert video.MAX_FRAMES == 768  # the default


def test_a_video_from_decoded_frames():
    frames = torch.randint(0, 255, (3, 3, 8, 10), dtype=torch.uint8)
    v = Video.from_frames(frames, fps=2.0)
    assert v.frames is frames and v.timestamps.tolist() == [0.0, 0.5, 1.0] and v.duration == 1.5
    assert v.audio is None
    with pytest.raises(MediaError, match="uint8 frames"):
        Video.from_frames(frames.float())


def test_decord_leaves_pillow_able_to_draw_colour_emoji():
    """decord's bundled zlib 1.2.3, loaded globally, broke every later libpng user (FreeType's colour
    emoji: "OSError: broken file") until import_decord put the system zlib first. In a fresh
    interpreter: which library loads first is decided once per process."""
    import subprocess
    import sys

    from omni.data.images import EMOJI_FONT

    if not EMOJI_FONT.is_file():
        pytest.skip(f"{EMOJI_FONT} not installed")
    code = ("from omni.media.video import import_decord; import_decord()\n"
            "from PIL import Image, ImageDraw, ImageFont\n"
            f"font = ImageFont.truetype({str(EMOJI_FONT)!r}, 109)\n"
            "ImageDraw.Draw(Image.new('RGBA', (160, 160))).text((8, 8), '\\U0001F600', font=font, "
            "embedded_color=True)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
