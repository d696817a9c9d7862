"""Images: decode anything PIL reads to uint8 RGB ``(3, H, W)``, plus the one resize every image
and video path shares.

``Image(source).pixels`` decodes on first use. Any mode becomes RGB: palette, grayscale, CMYK
(including Adobe's inverted CMYK JPEGs, which PIL handles), 16-bit (scaled to 8 bits, not
clipped), and alpha, which is flattened onto ``background`` (white by default). EXIF orientation
is applied. An animated GIF/PNG/WebP gives its **first frame**. Every failure is a
:class:`~omni.media.MediaError` naming the file and the problem.

Decompression bombs: an image whose header claims more than ``max_pixels`` (default
:data:`MAX_PIXELS` = 50 million, about 7071 x 7071, 150 MB as RGB) is refused before any pixel
is decoded, with the pixel count and the limit in the message. PIL's own guard (a warning above
``PIL.Image.MAX_IMAGE_PIXELS`` = 89M pixels, an error above twice that) is turned into the same
``MediaError``; to go beyond 179M pixels raise ``PIL.Image.MAX_IMAGE_PIXELS`` as well as
``max_pixels``.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omni.io import atomic_write_bytes
from omni.media.base import MediaError

MAX_PIXELS = 50_000_000
WHITE = (255, 255, 255)


class Image:
    """An image from a file path, raw encoded ``bytes``, a ``PIL.Image``, or a uint8 tensor ``(3, H, W)``.

    pixels: uint8 ``(3, H, W)`` RGB, alpha flattened on ``background``.
    rgba: uint8 ``(4, H, W)``, alpha kept (255 where the source has none); for compositing.
    """

    def __init__(self, source, *, background: tuple[int, int, int] = WHITE, max_pixels: int = MAX_PIXELS,
                 name: str | None = None):
        self.source = source
        self.background = tuple(int(c) for c in background)
        self.max_pixels = max_pixels
        self.name = name or (str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>")
        self._rgba: torch.Tensor | None = None
        self._pixels: torch.Tensor | None = None
        if isinstance(source, torch.Tensor):
            self._pixels = _check_tensor(source, self.name)

    def __repr__(self) -> str:
        return f"Image({self.name!r})"

    @property
    def pixels(self) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = flatten_alpha(self.rgba, self.background)
        return self._pixels

    @property
    def rgba(self) -> torch.Tensor:
        if self._rgba is None:
            if isinstance(self.source, torch.Tensor):
                alpha = torch.full((1, *self._pixels.shape[1:]), 255, dtype=torch.uint8)
                self._rgba = torch.cat([self._pixels, alpha])
            else:
                self._rgba = _decode_rgba(self.source, self.name, self.max_pixels)
        return self._rgba

    @property
    def height(self) -> int:
        return self.pixels.shape[1]

    @property
    def width(self) -> int:
        return self.pixels.shape[2]

    def save(self, path: str | Path) -> Path:
        """Write ``pixels`` as an image file (format from the suffix), atomically."""
        from PIL import Image as PILImage

        path = Path(path)
        buf = io.BytesIO()
        PILImage.fromarray(self.pixels.permute(1, 2, 0).numpy()).save(buf, format=_pil_format(path))
        atomic_write_bytes(path, buf.getvalue())
        return path


def _pil_format(path: Path) -> str:
    from PIL import Image as PILImage

    fmt = PILImage.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r}; use .png or .jpg")
    return fmt


def describe(x) -> str:
    """How a value looks, for error messages: ``torch.float32 (3, 4)`` for a tensor, else its type."""
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[0] != 3 or t.shape[1] < 1 or t.shape[2] < 1:
        raise MediaError(name, f"expected a uint8 tensor (3, H, W), got {describe(t)}")
    return t.contiguous()


def _open_pil(source, name: str, max_pixels: int):
    """Open (header only) with PIL and check the pixel budget; returns an un-decoded PIL image."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    if isinstance(source, PILImage.Image):
        im = source
    else:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise MediaError(name, "empty data (0 bytes)")
            fp = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise MediaError(name, "file not found" if not path.exists() else "not a regular file")
            if path.stat().st_size == 0:
                raise MediaError(name, "empty file (0 bytes)")
            fp = io.BytesIO(path.read_bytes())  # PIL decodes lazily: hold no file handle open
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                im = PILImage.open(fp)
        except PILImage.DecompressionBombError as e:
            m = re.search(r"\((\d+) pixels\)", str(e))
            count = f"{int(m.group(1)):,} pixels" if m else "more pixels than PIL allows"
            raise MediaError(name, f"image of {count} exceeds the decompression-bomb limit of "
                                   f"{min(max_pixels, 2 * PILImage.MAX_IMAGE_PIXELS):,} pixels") from None
        except UnidentifiedImageError:
            raise MediaError(name, "not a recognised image (corrupt header or unsupported format)") from None
        except OSError as e:
            raise MediaError(name, f"cannot open image ({e})") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise MediaError(name, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise MediaError(name, f"image of {w}x{h} = {w * h:,} pixels exceeds the decompression-bomb limit "
                               f"of {max_pixels:,} pixels (omni.media.image.MAX_PIXELS; pass max_pixels= to "
                               f"raise it)")
    return im


def _decode_rgba(source, name: str, max_pixels: int) -> torch.Tensor:
    """Decode to uint8 (4, H, W): first frame, EXIF orientation applied, any mode to RGBA."""
    from PIL import ImageOps

    im = _open_pil(source, name, max_pixels)
    try:
        im.seek(0)  # animated GIF/PNG/WebP: the first frame
        im.load()
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF (PIL raises a mix of types): keep the pixels as stored
            pass
        arr = _to_rgba_array(im)
    except MediaError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL reports truncation as OSError
        raise MediaError(name, f"truncated or corrupt image data ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _to_rgba_array(im) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, 4). 16-bit and 32-bit integer modes are scaled, not clipped."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        # 'I' is how PIL opens 16-bit PNG/TIFF grayscale; values above 65535 are clipped.
        gray = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    if mode == "F":
        a = np.asarray(im)
        scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0  # float images in [0, 1] or [0, 255]
        gray = np.clip(np.nan_to_num(a) * scale, 0, 255).round().astype(np.uint8)
        return np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    if mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in im.info:  # alpha or a colour key
        return np.array(im.convert("RGBA"))
    rgb = np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, P, L, 1 all convert to RGB directly
    return np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])


def flatten_alpha(rgba: torch.Tensor, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """uint8 (4, H, W) -> uint8 (3, H, W): alpha-composite over a solid ``background`` colour."""
    alpha = rgba[3:].float() / 255.0
    bg = torch.tensor(background, dtype=torch.float32).view(3, 1, 1)
    rgb = rgba[:3].float() * alpha + bg * (1.0 - alpha)
    return rgb.round().clamp(0, 255).to(torch.uint8)


def resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(..., C, H, W)`` to ``size`` = (H', W') with antialiased bicubic interpolation.

    The one resize every image and video path uses (tokenizer preprocessing, corpus builders),
    so training and inference see identical pixels. uint8 in -> uint8 out (rounded, clamped);
    float in -> float out.
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be at least 1x1, got {h}x{w}")
    if tuple(pixels.shape[-2:]) == (h, w):
        return pixels.clone()
    lead = pixels.shape[:-3]
    x = pixels.reshape(-1, *pixels.shape[-3:]).float()
    # antialias only matters (and is only supported) when shrinking; bicubic overshoots, so clamp uint8
    y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    y = y.reshape(*lead, *y.shape[-3:])
    if pixels.dtype == torch.uint8:
        return y.round().clamp(0, 255).to(torch.uint8)
    return y.to(pixels.dtype)


def fit_within(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(H', W') with the aspect ratio kept and the longer side at most ``max_size`` (never upscaled)."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))
