"""omni.data.video: moving-stamp clips (direction only in frame order), audio from the stamp's
sound, and splits that hold out stamp/direction pairs."""

import json

import pytest
import torch

from omni.data.images import STAMPS_DIR, find_stamps, stamp_rgba
from omni.data.video import DIRECTIONS, SPEEDS, build_video_corpus, direction_of, noun_phrase, render_clip
from omni.io import read_jsonl
from omni.media.video import Video


def test_noun_phrase():
    assert noun_phrase("A Pickup truck.") == "a Pickup truck"
    assert noun_phrase("An ant.") == "an ant"
    assert noun_phrase("The letter Q.") == "the letter Q"
    assert noun_phrase("A peacock (a male peafowl).") is None
    assert noun_phrase("A school bus that takes children to school.") is None
    assert noun_phrase("Saturn—the second largest planet.") is None


def test_direction_of():
    assert direction_of("a frog moves Left quickly.") == "left"
    assert direction_of("a frog moves up and down") is None
    assert direction_of("a frog moves slowly") is None
    assert direction_of("a frog moves leftwards") is None  # whole words only


def _stamp_box(size=8):
    rgb = torch.zeros(3, size, size)
    rgb[0] = 255.0  # opaque red, premultiplied
    return rgb, torch.ones(1, size, size)


def _centres(frames):
    red = (frames[:, 0].int() - frames[:, 1].int() > 100).float()  # (N, H, W): where the red box is
    ys, xs = torch.arange(frames.shape[2]).float(), torch.arange(frames.shape[3]).float()
    n = red.sum((1, 2))
    return (red.sum(1) * xs).sum(1) / n, (red.sum(2) * ys).sum(1) / n


def test_render_clip_moves_the_stamp_and_only_order_tells_direction():
    rgb, alpha = _stamp_box()
    clip = {(d, s): render_clip(rgb, alpha, d, s, 32, 6, torch.Generator().manual_seed(0))
            for d in DIRECTIONS for s in SPEEDS}
    assert clip["right", "quickly"].shape == (6, 3, 32, 32) and clip["right", "quickly"].dtype == torch.uint8
    x, y = _centres(clip["right", "quickly"])
    assert x[0] == pytest.approx(3.5) and x[-1] == pytest.approx(27.5)
    assert (x.diff() > 0).all() and y.std() == 0
    x, y = _centres(clip["up", "slowly"])
    assert (y.diff() < 0).all() and x.std() == 0 and y[0] - y[-1] == pytest.approx(12, abs=1)  # half of 24
    for a, b in (("left", "right"), ("up", "down")):
        for s in SPEEDS:
            assert torch.equal(clip[a, s], clip[b, s].flip(0))  # same frames, reverse order
    with pytest.raises(ValueError, match="direction must be one of"):
        render_clip(rgb, alpha, "sideways", "quickly", 32, 4, torch.Generator())


def test_build_video_corpus_splits_and_media(tmp_path, fake_stamps):
    out = tmp_path / "clips"
    stats = build_video_corpus(out, stamps_dir=fake_stamps, size=32, fps=4, duration=1.0)
    # eligible: frog, frog-1, truck, car, rocket (svg, if cairosvg), and broken (counted bad); not the bus
    assert stats["frames_per_clip"] == 4 and stats["bad"] == 1
    assert json.loads((out / "corpus.json").read_text()) == stats
    rows = {s: list(read_jsonl(out / f"{s}.jsonl")) for s in ("train", "val", "test")}
    used = stats["stamps_used"]
    assert stats["clips"] == used * 8 and sum(map(len, rows.values())) == used * 8
    pairs = {s: {(r["stamp"], r["direction"]) for r in rs} for s, rs in rows.items()}
    assert not pairs["test"] & pairs["train"] and not pairs["val"] & pairs["train"]
    assert not pairs["val"] & pairs["test"]
    assert len(pairs["test"]) == used and len(pairs["val"]) == (used + 3) // 4
    train_stamps, train_dirs = {p[0] for p in pairs["train"]}, {p[1] for p in pairs["train"]}
    assert all(st in train_stamps and d in train_dirs for st, d in pairs["test"])  # each seen, never together
    for r in rows["test"]:
        assert r["caption"] == f'{r["noun"]} moves {r["direction"]} {r["speed"]}' and r["split"] == "test"
    frog = next(r for r in rows["train"] + rows["test"]
                if r["stamp"] == "animals/frog" and r["speed"] == "quickly")
    assert frog["has_audio"] and frog["caption"].startswith("a frog moves ")
    video = Video(out / frog["video"], num_frames=4)
    assert video.frames.shape == (4, 3, 32, 32) and video.native_fps == pytest.approx(4)
    audio = video.audio
    assert audio.sample_rate == 16000 and audio.waveform.shape == (16000,)
    assert audio.waveform[:7000].abs().max() > 0.3 and audio.waveform[9000:].abs().max() < 0.01  # 0.5 s tone
    silent = next(r for r in rows["train"] if r["stamp"] == "vehicles/truck")
    assert not silent["has_audio"] and Video(out / silent["video"]).audio is None


def test_bad_arguments(tmp_path, fake_stamps):
    with pytest.raises(ValueError, match="size must be an even number >= 16"):
        build_video_corpus(tmp_path, stamps_dir=fake_stamps, size=33)
    with pytest.raises(ValueError, match="at least 2 frames"):
        build_video_corpus(tmp_path, stamps_dir=fake_stamps, fps=1, duration=1)


@pytest.mark.skipif(not STAMPS_DIR.is_dir(), reason="Tux Paint stamps not installed "
                                                   "(apt-get install tuxpaint-stamps-default)")
def test_real_stamps_clips(tmp_path):
    stats = build_video_corpus(tmp_path, max_stamps=2, size=48, fps=4, duration=1.0)
    assert stats["stamps_eligible"] >= 500 and stats["stamps_with_sound"] == 2 and stats["clips"] == 16
    rows = [r for s in ("train", "val", "test") for r in read_jsonl(tmp_path / f"{s}.jsonl")]
    r = rows[0]
    video = Video(tmp_path / r["video"], num_frames=4)
    assert r["has_audio"] and video.audio.waveform.abs().max() > 0.01  # the stamp's real sound
    assert video.frames.float().std() > 10
    stamp = next(s for s in find_stamps() if s.id == r["stamp"])
    _rgb, alpha = stamp_rgba(stamp, 21)
    assert max(alpha.shape[1:]) == 21 and alpha.max() == 1


def test_a_second_build_of_a_folder_being_built_is_refused(tmp_path, fake_stamps, lock_held_elsewhere,
                                                           folder_files):
    from omni.io import LockedError

    out = tmp_path / "clips"
    build_video_corpus(out, stamps_dir=fake_stamps, size=32, fps=2, duration=1.0, max_stamps=1)
    before = folder_files(out)
    with lock_held_elsewhere(out, "video corpus") as pid:
        with pytest.raises(LockedError,
                           match=rf"this video corpus is being written by another process \(pid {pid} "):
            build_video_corpus(out, stamps_dir=fake_stamps, size=16, fps=2, duration=1.0)
    assert folder_files(out) == before
