"""omni.media.image: every PIL mode to RGB, EXIF, first GIF frame, bad input as MediaError, resize."""

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from omni.media import MediaError
from omni.media.image import MAX_PIXELS, Image, fit_within, flatten_alpha, resize

STAMPS = Path("/usr/share/tuxpaint/stamps")


def _save(im: PILImage.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_rgb_png_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image(_save(PILImage.fromarray(arr), tmp_path / "a.png"))
    assert img.pixels.dtype == torch.uint8 and img.pixels.shape == (3, 5, 7)
    assert torch.equal(img.pixels, torch.from_numpy(arr).permute(2, 0, 1))
    assert (img.height, img.width) == (5, 7)


def test_alpha_is_flattened_on_the_background(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (200, 0, 0, 0)      # fully transparent -> background
    arr[0, 1] = (200, 0, 0, 255)    # opaque -> itself
    arr[1, 0] = (0, 0, 0, 128)      # half black over white -> ~127
    path = _save(PILImage.fromarray(arr, "RGBA"), tmp_path / "a.png")
    px = Image(path).pixels
    assert px[:, 0, 0].tolist() == [255, 255, 255]
    assert px[:, 0, 1].tolist() == [200, 0, 0]
    assert px[:, 1, 0].tolist() == [127, 127, 127]
    assert Image(path, background=(0, 255, 0)).pixels[:, 0, 0].tolist() == [0, 255, 0]
    rgba = Image(path).rgba
    assert rgba.shape == (4, 2, 2) and rgba[3, 0, 0] == 0 and torch.equal(flatten_alpha(rgba), px)


def test_palette_png_with_and_without_transparency(tmp_path):
    im = PILImage.new("P", (3, 2))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    px = Image(_save(im, tmp_path / "p.png")).pixels
    assert px[:, 0, 0].tolist() == [255, 0, 0] and px[:, 0, 1].tolist() == [0, 0, 255]
    px = Image(_save(im, tmp_path / "pt.png", transparency=0)).pixels  # index 0 transparent
    assert px[:, 0, 0].tolist() == [255, 255, 255] and px[:, 0, 1].tolist() == [0, 0, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    im = PILImage.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    path = _save(im, tmp_path / "c.jpg", quality=95)
    assert PILImage.open(path).mode == "CMYK"
    r, g, b = Image(path).pixels[:, 4, 4].tolist()
    assert r > 230 and g < 30 and b < 30


def test_grayscale_and_16_bit_are_scaled_not_clipped(tmp_path):
    px = Image(_save(PILImage.new("L", (2, 2), 77), tmp_path / "l.png")).pixels
    assert px.unique().tolist() == [77]
    arr16 = np.array([[0, 1000], [40000, 65535]], np.uint16)
    path = _save(PILImage.fromarray(arr16), tmp_path / "g16.png")
    assert PILImage.open(path).mode.startswith("I")
    px = Image(path).pixels
    assert px[0].tolist() == [[0, 1000 >> 8], [40000 >> 8, 255]] and torch.equal(px[0], px[2])
    px = Image(_save(PILImage.new("1", (2, 2), 1), tmp_path / "b.png")).pixels
    assert px.unique().tolist() == [255]


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [PILImage.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert PILImage.open(path).n_frames == 2
    px = Image(path).pixels
    assert px[:, 0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
    im = PILImage.new("RGB", (3, 2), (0, 0, 0))
    im.putpixel((0, 0), (255, 255, 255))  # top-left white
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(im, tmp_path / "o.jpg", exif=exif, quality=100)
    px = Image(path).pixels
    assert px.shape == (3, 3, 2)  # width and height swapped
    assert px[0, 0, -1] > 200 and px[0, 0, 0] < 50  # the white corner moved to the top-right


def test_one_by_one_and_other_sources(tmp_path):
    path = _save(PILImage.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "1.png")
    assert Image(path).pixels.flatten().tolist() == [1, 2, 3]
    assert Image(path.read_bytes()).pixels.flatten().tolist() == [1, 2, 3]
    assert Image(PILImage.new("LA", (1, 1), (0, 0))).pixels.flatten().tolist() == [255, 255, 255]
    t = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert torch.equal(Image(t).pixels, t) and Image(t).rgba[3].unique().tolist() == [255]
    for bad in (t.float(), t[0], torch.zeros(4, 2, 2, dtype=torch.uint8)):
        with pytest.raises(MediaError, match=r"expected a uint8 tensor \(3, H, W\)"):
            Image(bad)


def test_save_round_trip(tmp_path):
    t = torch.randint(0, 256, (3, 6, 4), dtype=torch.uint8)
    out = Image(t).save(tmp_path / "x" / "s.png")
    assert torch.equal(Image(out).pixels, t)
    with pytest.raises(ValueError, match="unknown image suffix"):
        Image(t).save(tmp_path / "s.nope")


@pytest.mark.parametrize("case, problem", [
    ("missing", "file not found"),
    ("empty", r"empty file \(0 bytes\)"),
    ("garbage", "not a recognised image"),
    ("truncated", "truncated or corrupt image data"),
])
def test_bad_files_raise_media_error_naming_the_file(tmp_path, case, problem):
    path = tmp_path / f"{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"\x89PNX not an image at all" * 10)
    elif case == "truncated":
        arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        buf = io.BytesIO()
        PILImage.fromarray(arr).save(buf, format="PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(MediaError, match=problem) as e:
        _ = Image(path).pixels
    assert str(path) in str(e.value) and isinstance(e.value, ValueError)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height (1-bit gray) and whose data is one empty row: the
    bomb check must fire on the header, before any decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side, count", [(20000, "400,000,000"), (8000, "64,000,000")])
def test_absurd_sizes_fail_with_pixel_count_and_limit(tmp_path, side, count):
    # 20000^2 trips PIL's own guard first (> 2 x 89M); 8000^2 passes PIL's and trips ours (50M).
    path = _png_header_only(tmp_path / "bomb.png", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak
        with pytest.raises(MediaError, match=f"{count} pixels exceeds the decompression-bomb limit of") as e:
            _ = Image(path).pixels
    limit = f"{MAX_PIXELS:,}" if side == 8000 else f"{min(MAX_PIXELS, 2 * PILImage.MAX_IMAGE_PIXELS):,}"
    assert limit in str(e.value) and str(path) in str(e.value)


def test_resize_and_fit_within():
    t = torch.full((2, 3, 10, 20), 200, dtype=torch.uint8)
    out = resize(t, (5, 7))
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.uint8 and out.unique().tolist() == [200]
    f = resize(t.float(), (4, 4))
    assert f.dtype == torch.float32 and torch.allclose(f, torch.full_like(f, 200.0))
    ramp = torch.arange(16, dtype=torch.uint8).repeat(3, 16, 1) * 16
    up = resize(ramp, (32, 32))
    assert up.min() >= 0 and up[0, 0].diff().ge(0).all()  # monotone ramp stays monotone, no wrap-around
    assert fit_within(100, 50, 64) == (64, 32) and fit_within(10, 20, 64) == (10, 20)
    assert fit_within(1, 1000, 10) == (1, 10)
    with pytest.raises(ValueError, match="at least 1x1"):
        resize(t, (0, 3))


@pytest.mark.skipif(not STAMPS.is_dir(),
                    reason="Tux Paint stamps not installed (apt-get install tuxpaint-stamps-default)")
def test_real_tux_paint_stamp():
    path = STAMPS / "animals" / "amphibians" / "frog.png"
    img = Image(path)
    assert img.rgba.shape[0] == 4 and img.rgba[3].min() == 0  # a cut-out with transparent background
    assert img.pixels[:, 0, 0].tolist() == [255, 255, 255]  # flattened on white
    assert img.pixels.float().std() > 20  # real picture content
