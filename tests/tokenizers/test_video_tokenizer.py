"""omni.tokenizers.video: M-RoPE and Q-Former paths, budgets checked before any model runs, and the
time-information switch for the temporal ablation."""

import pytest
import torch

from omni.media.video import write_video
from omni.tokenizers.image import ImageTokenizerConfig, PatchifyImageTokenizer, build_image_tokenizer
from omni.tokenizers.video import VideoTokenizer, VideoTokenizerConfig, build_video_tokenizer


def _frames(n=4, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def patchify():
    torch.manual_seed(0)
    return PatchifyImageTokenizer(patch_size=8, out_dim=16, image_size=32).eval()


def test_mrope_keeps_every_patch_with_frame_as_time(patchify):
    vt = VideoTokenizer(patchify, num_frames=4)
    frames = _frames()
    with torch.no_grad():
        feats, grid = vt.encode(frames)
        assert grid == (4, 4, 4) and feats.shape == (64, 16) and vt.out_dim == 16
        per_frame = torch.stack([patchify.encode(f)[0] for f in frames])  # (4, 16, 16)
    torch.testing.assert_close(feats, per_frame.reshape(64, 16))
    assert vt.num_tokens(4, 100, 50) == 64


def test_frame_diff_adds_each_tokens_change_since_the_previous_frame(patchify):
    vt = VideoTokenizer(patchify, num_frames=4, frame_diff=True)
    frames = _frames()
    with torch.no_grad():
        feats, grid = vt.encode(frames)
        plain = VideoTokenizer(patchify, num_frames=4).encode(frames)[0].view(4, 16, 16)
        backwards = vt.encode(frames.flip(0))[0].view(4, 16, 32)
    assert grid == (4, 4, 4) and feats.shape == (64, 32) and vt.out_dim == 32  # as many tokens, 2x wide
    feats = feats.view(4, 16, 32)
    torch.testing.assert_close(feats[..., :16], plain)
    assert not feats[0, :, 16:].any()  # the first frame has no change
    torch.testing.assert_close(feats[1:, :, 16:], plain[1:] - plain[:-1])
    # played backwards, each step's change is the same change with its sign flipped
    torch.testing.assert_close(backwards[1:, :, 16:], -(plain[1:] - plain[:-1]).flip(0))


def test_mrope_without_time_positions_shuffles_frames(patchify):
    vt = VideoTokenizer(patchify, num_frames=6, time_positions=False)
    frames = _frames(6)
    with torch.no_grad():
        ordered = VideoTokenizer(patchify).encode(frames)[0].view(6, 16, 16)
        a = vt.encode(frames, generator=torch.Generator().manual_seed(1))[0].view(6, 16, 16)
        b = vt.encode(frames, generator=torch.Generator().manual_seed(1))[0].view(6, 16, 16)
    torch.testing.assert_close(a, b)  # reproducible with a generator
    perm = [next(j for j in range(6) if torch.equal(a[i], ordered[j])) for i in range(6)]
    assert sorted(perm) == list(range(6)) and perm != list(range(6))  # same frames, another order


@pytest.mark.parametrize("tower", ["patchify", "siglip"])
def test_qformer_gives_m_tokens_and_time_positions_decide_order_sensitivity(tower):
    torch.manual_seed(0)
    img = (PatchifyImageTokenizer(patch_size=8, out_dim=16, image_size=32) if tower == "patchify"
           else build_image_tokenizer(ImageTokenizerConfig(kind="siglip", size="debug")))
    frames = _frames(5)
    reversed_frames = frames.flip(0)
    with_time = VideoTokenizer(img, temporal="qformer", num_queries=6, qformer_heads=2).eval()
    without = VideoTokenizer(img, temporal="qformer", num_queries=6, qformer_heads=2,
                             time_positions=False).eval()
    with torch.no_grad():
        feats, grid = with_time.encode(frames)
        assert feats.shape == (6, img.out_dim) and grid == (6, 1, 1) and with_time.num_tokens(5, 32, 32) == 6
        assert not torch.allclose(feats, with_time.encode(reversed_frames)[0], atol=1e-4)
        assert without.frame_pos is None
        torch.testing.assert_close(without.encode(frames)[0], without.encode(reversed_frames)[0],
                                   atol=1e-5, rtol=1e-5)  # no time information left


class _Boom(Exception):
    pass


def test_budgets_fail_before_any_resize_or_forward(monkeypatch):
    img = PatchifyImageTokenizer(patch_size=8, out_dim=8, image_size=256)
    vt = VideoTokenizer(img, num_frames=64, max_frames=64, max_total_tokens=16384)

    def boom(*a, **k):
        raise _Boom("the model ran")
    monkeypatch.setattr(img, "forward", boom)
    monkeypatch.setattr(img, "preprocess", boom)
    frames = torch.zeros(64, 3, 256, 256, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^64 frames x 1024 tokens = 65536 tokens exceeds "
                                         r"max_total_tokens=16384; lower num_frames or the resolution$"):
        vt.encode(frames)
    with pytest.raises(ValueError, match="65 frames exceeds max_frames=64"):
        vt.encode(torch.zeros(65, 3, 2, 2, dtype=torch.uint8))
    small = VideoTokenizer(img, max_pixels_per_frame=128 * 128)
    with pytest.raises(ValueError, match="each frame is 256x256 = 65536 pixels after resizing, over "
                                         "max_pixels_per_frame=16384"):
        small.check_budget(1, 10, 10)
    assert VideoTokenizer(img).check_budget(8, 999, 999) == 8 * 1024
    with pytest.raises(ValueError, match="non-empty uint8 tensor"):
        vt.encode(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))


def test_dynamic_resolution_budget_uses_smart_resize():
    img = PatchifyImageTokenizer(patch_size=8, out_dim=8, image_size=None, dynamic=True, max_pixels=64 * 64,
                                 min_pixels=8 * 8)
    vt = VideoTokenizer(img, max_total_tokens=100)
    assert vt.check_budget(1, 64, 64) == 64
    with pytest.raises(ValueError, match="2 frames x 64 tokens = 128 tokens exceeds max_total_tokens=100"):
        vt.check_budget(2, 1000, 1000)


def test_encode_a_real_mp4(tmp_path, patchify):
    path = write_video(tmp_path / "c.mp4", _frames(12, 48, 64), fps=8)
    vt = build_video_tokenizer(VideoTokenizerConfig(num_frames=3), patchify)
    video = vt.load(path)
    with torch.no_grad():
        feats, grid = vt.encode(video)
    assert video.frames.shape == (3, 3, 48, 64) and grid == (3, 4, 4) and feats.shape == (48, 16)


@pytest.mark.parametrize("kw, problem", [
    (dict(temporal="lstm"), "temporal must be one of mrope, qformer"),
    (dict(num_frames=100), r"num_frames \(100\) exceeds max_frames \(64\)"),
    (dict(fps=0.0), "fps must be > 0"),
    (dict(num_queries=0), "num_queries must be >= 1"),
])
def test_config_errors(kw, problem):
    with pytest.raises(ValueError, match=problem):
        VideoTokenizerConfig(**kw).validate()


def test_fps_sampling_is_capped_by_max_frames(tmp_path, patchify):
    """With fps, max_frames caps the frames (num_frames is the uniform count, not used), and the
    frames keep their true times."""
    VideoTokenizerConfig(num_frames=8, fps=2.0, max_frames=4).validate()  # 8 > 4 does not matter with fps
    clip = write_video(tmp_path / "c.mp4", _frames(n=20), fps=10)  # 2 s
    tok = VideoTokenizer(patchify, num_frames=8, fps=4.0, max_frames=5)
    video = tok.load(clip)
    assert len(video.frames) == 5 and video.timestamps[-1] == pytest.approx(1.9)  # 8 wanted, 5 spanning it
    assert len(tok.load(clip, start=1.0).frames) == 4  # 1 s x 4 fps
